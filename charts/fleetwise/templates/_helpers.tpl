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


{{/* What the operator does inside a namespace it manages. */}}
{{- define "fleetwise.operatorNamespacedRules" }}
  - apiGroups: [fleetwise.dev]
    resources: [modeldeployments]
    verbs: [get, list, watch, patch]        # patch: kopf's finalizer and progress annotations
  - apiGroups: [fleetwise.dev]
    resources: [modeldeployments/status]
    verbs: [patch]
  - apiGroups: [""]
    resources: [pods]
    verbs: [create, delete, patch]          # patch: routability labels and annotations
  - apiGroups: [""]
    resources: [pods/binding]
    verbs: [create]
  - apiGroups: [""]
    resources: [services]
    verbs: [list, watch, create]            # list, watch: a Service deleted by hand is made again
  - apiGroups: [""]
    resources: [events]
    verbs: [create]
{{- end }}
