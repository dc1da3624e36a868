{{- define "fleetwise.fullname" -}}
{{- printf "%s-fleetwise" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fleetwise.labels" -}}
app.kubernetes.io/name: fleetwise
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "fleetwise.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}
