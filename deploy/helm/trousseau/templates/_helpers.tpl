{{- define "trousseau.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "trousseau.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "trousseau.selectorLabels" -}}
app.kubernetes.io/name: {{ include "trousseau.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "trousseau.labels" -}}
{{ include "trousseau.selectorLabels" . }}
app.kubernetes.io/component: kms-plugin
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "trousseau.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "trousseau.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "trousseau.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Where the kubelet sends probes: the pod shares the node's network, so a listener on
     loopback or on every address is reached at 127.0.0.1, never at the node IP. */}}
{{- define "trousseau.probeHost" -}}
{{- $h := .Values.http.host -}}
{{- if or (eq $h "0.0.0.0") (eq $h "localhost") (hasPrefix "127." $h) -}}
127.0.0.1
{{- else -}}
{{- $h -}}
{{- end -}}
{{- end -}}

{{- define "trousseau.loopback" -}}
{{- if or (eq .Values.http.host "localhost") (hasPrefix "127." .Values.http.host) -}}true{{- end -}}
{{- end -}}

{{/* The plugin's http section: the loopback listener, and the TLS scrape listener when enabled. */}}
{{- define "trousseau.httpConfig" -}}
{{- $http := dict "listen" (printf "%s:%d" .Values.http.host (int .Values.http.port)) -}}
{{- $s := .Values.metrics.scrape -}}
{{- if $s.enabled -}}
{{- $_ := set $http "scrape" (dict "listen" (printf "%s:%d" $s.host (int $s.port)) "certFile" $s.certFile "keyFile" $s.keyFile "bearerTokenFile" $s.bearerTokenFile) -}}
{{- end -}}
{{- toYaml $http -}}
{{- end -}}

{{/* The plugin configuration file (docs/configuration.md). */}}
{{- define "trousseau.config" -}}
{{- $config := dict
  "socket" (dict
    "path" (printf "%s/%s" (trimSuffix "/" .Values.socket.dir) .Values.socket.name)
    "mode" .Values.socket.mode
    "group" (printf "%d" (int .Values.runAsGroup)))
  "quorum" (int .Values.quorum)
  "backends" .Values.backends
  "http" (include "trousseau.httpConfig" . | fromYaml) -}}
{{- $config = merge $config (deepCopy .Values.settings) -}}
{{- toYaml $config -}}
{{- end -}}
