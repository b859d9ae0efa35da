{{/* Names and labels shared by every object. */}}
{{- define "polyreward.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "polyreward.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "polyreward.selectorLabels" -}}
app.kubernetes.io/name: {{ include "polyreward.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "polyreward.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "polyreward.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "polyreward.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "polyreward.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret with API keys: one the chart makes, or the user's own; empty when auth is off. */}}
{{- define "polyreward.apiKeySecret" -}}
{{- if .Values.apiKeys.existingSecret }}
{{- .Values.apiKeys.existingSecret }}
{{- else if .Values.apiKeys.keys }}
{{- include "polyreward.fullname" . }}-api-keys
{{- end }}
{{- end }}

{{/* The device the server uses: the configured one, else cuda when a GPU is requested, else auto. */}}
{{- define "polyreward.device" -}}
{{- if .Values.config.device }}
{{- .Values.config.device }}
{{- else if gt (int .Values.gpu.count) 0 }}
{{- "cuda" }}
{{- else }}
{{- "auto" }}
{{- end }}
{{- end }}

{{/* A rolling update must let a pod drain before SIGKILL: preStop sleep, then the server's own drain, then
     the requests still in flight (at most requestTimeout). */}}
{{- define "polyreward.checkGracePeriod" -}}
{{- $needed := addf .Values.lifecycle.preStopSleepSeconds .Values.config.drainSeconds .Values.config.requestTimeout }}
{{- if lt (float64 .Values.lifecycle.terminationGracePeriodSeconds) (float64 $needed) }}
{{- fail (printf "lifecycle.terminationGracePeriodSeconds (%v) must be at least lifecycle.preStopSleepSeconds + config.drainSeconds + config.requestTimeout (%v), or pods are killed with requests in flight" .Values.lifecycle.terminationGracePeriodSeconds $needed) }}
{{- end }}
{{- end }}
