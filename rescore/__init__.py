"""Batch rescoring of preference and rating datasets (`polyreward rescore`)."""
