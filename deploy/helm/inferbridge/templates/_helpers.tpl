{{- define "inferbridge.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "inferbridge.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "inferbridge.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{ include "inferbridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "inferbridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "inferbridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The proxy's pods (the Redis pods have the same name and instance, another component). */}}
{{- define "inferbridge.proxySelector" -}}
{{ include "inferbridge.selectorLabels" . }}
app.kubernetes.io/component: proxy
{{- end }}

{{/* Whether the replicas share a Redis (in the release, or given by url). */}}
{{- define "inferbridge.shared" -}}
{{- if or .Values.redis.enabled .Values.redis.url }}true{{ end }}
{{- end }}

{{/* The config file: the values' config, with state: and server.drain_timeout. */}}
{{- define "inferbridge.config" -}}
{{- $config := deepCopy .Values.config }}
{{- $server := default (dict) (get $config "server") }}
{{- $_ := set $server "drain_timeout" .Values.drainTimeout }}
{{- $_ := set $config "server" $server }}
{{- if include "inferbridge.shared" . }}
{{- $state := dict "store" "redis" "url" "os.environ/REDIS_URL" "timeout" .Values.state.timeout "on_store_error" .Values.state.onStoreError "lease_ttl" .Values.state.leaseTtl "sync_interval" .Values.state.syncInterval }}
{{- $_ := set $config "state" $state }}
{{- end }}
{{- toYaml $config }}
{{- end }}
