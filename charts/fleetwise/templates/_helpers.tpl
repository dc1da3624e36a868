{{- define "fleetwise.fullname" -}}
{{- printf "%s-fleetwise" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fleetwise.labels" -}}
app.kubernetes.io/name: fleetwise
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/* The shared internal token's Secret in the release namespace (the operator copies it
     into the workers' namespaces as fleetwise-internal-token). */}}
{{- define "fleetwise.tokenSecret" -}}
{{ include "fleetwise.fullname" . }}-internal-token
{{- end -}}

{{/* The token's volume and where it is mounted, for the operator's and the router's pods. */}}
{{- define "fleetwise.tokenVolume" -}}
- name: internal-token
  secret:
    secretName: {{ include "fleetwise.tokenSecret" . }}
    defaultMode: 0440
    items: [{key: token, path: token}]
{{- end -}}
{{- define "fleetwise.tokenMount" -}}
- {name: internal-token, mountPath: /var/run/fleetwise, readOnly: true}
{{- end -}}
{{- define "fleetwise.tokenEnv" -}}
- {name: FLEETWISE_INTERNAL_TOKEN_FILE, value: /var/run/fleetwise/token}
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
  - apiGroups: [fleetwise.dev]
    resources: [faultpolicies]
    verbs: [list, watch, patch]             # patch: the fault loop's daemon (kopf's finalizer)
  - apiGroups: [fleetwise.dev]
    resources: [faultpolicies/status]
    verbs: [patch]                          # the fault loop's status
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
  - apiGroups: [""]
    resources: [secrets]
    verbs: [create]                         # the internal token's copy, where worker pods mount it
  - apiGroups: [""]
    resources: [secrets]
    resourceNames: [fleetwise-internal-token]
    verbs: [get, patch]                     # that copy only: kept equal to the chart's Secret
{{- end }}

{{/* Spread a component's pods over the topology keys values name. */}}
{{- define "fleetwise.topologySpread" -}}
{{- $root := index . 0 -}}{{- $component := index . 1 -}}{{- $spread := index . 2 -}}
{{- if $spread.enabled }}
topologySpreadConstraints:
{{- range $spread.topologyKeys }}
  - maxSkew: {{ $spread.maxSkew }}
    topologyKey: {{ . }}
    whenUnsatisfiable: {{ $spread.whenUnsatisfiable }}
    labelSelector:
      matchLabels: {app.kubernetes.io/instance: {{ $root.Release.Name }}, app.kubernetes.io/component: {{ $component }}}
{{- end }}
{{- end }}
{{- end -}}

{{/* A PodDisruptionBudget for a component that runs more than one replica. */}}
{{- define "fleetwise.pdb" -}}
{{- $root := index . 0 -}}{{- $component := index . 1 -}}{{- $values := index . 2 -}}
{{- if and $values.podDisruptionBudget.enabled (gt (int $values.replicas) 1) }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "fleetwise.fullname" $root }}-{{ $component }}
  namespace: {{ $root.Release.Namespace }}
  labels: {{- include "fleetwise.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ $component }}
spec:
  maxUnavailable: {{ $values.podDisruptionBudget.maxUnavailable }}
  selector:
    matchLabels: {app.kubernetes.io/instance: {{ $root.Release.Name }}, app.kubernetes.io/component: {{ $component }}}
{{- end }}
{{- end -}}

{{/* The namespaces worker pods run in, for what selects them (NetworkPolicy, PodMonitor). */}}
{{- define "fleetwise.workerNamespaces" -}}
{{- .Values.networkPolicy.namespaces | default .Values.operator.watchNamespaces | default (list .Release.Namespace) | toJson -}}
{{- end -}}

{{- define "fleetwise.adminSecret" -}}
{{- .Values.admin.tokenSecret | default (printf "%s-admin-token" (include "fleetwise.fullname" .)) -}}
{{- end -}}
