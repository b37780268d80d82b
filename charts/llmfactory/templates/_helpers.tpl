{{- define "llmfactory.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "llmfactory.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "llmfactory.labels" -}}
{{ include "llmfactory.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "llmfactory.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "llmfactory.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* What the operator does, and nothing more: one list shared by the ClusterRole and the Roles. */}}
{{- define "llmfactory.namespacedRules" -}}
# The four kinds: watch, patch status and finalizers, annotate (kopf's progress and our nudges).
- apiGroups: [llmfactory.dev]
  resources: [datasetbuilds, finetunes, benchmarks, quantizations]
  verbs: [get, list, watch, patch]
- apiGroups: [llmfactory.dev]
  resources: [datasetbuilds/status, finetunes/status, benchmarks/status, quantizations/status]
  verbs: [get, patch]
# Children: the task ConfigMap, the Job, the rendezvous Service of multi-node training. Deleted by
# the garbage collector through ownerReferences. A Job is patched only to suspend or resume it
# (spec.suspend), and deleted only when a failed run is retried (llmfactory.dev/retry).
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
# spec.suspend of a resource in a Kueue queue deactivates its Job's Workload (Kueue owns the Job's suspend).
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [list, patch]
- apiGroups: [""]
  resources: [configmaps, services]
  verbs: [get, create]
# Why a Job's pod is stuck (unschedulable, image pull, OOM) is copied into the resource's conditions.
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
# kopf posts an Event for every transition.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end -}}

{{- define "llmfactory.peered" -}}
{{- if gt (int .Values.replicaCount) 1 }}true{{ end -}}
{{- end -}}
