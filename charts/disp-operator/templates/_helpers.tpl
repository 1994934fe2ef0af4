{{/* Names and labels shared by every object of the release. */}}
{{- define "disp-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "disp-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "disp-operator.labels" -}}
{{ include "disp-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "disp-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "disp-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The rules the operator needs inside the namespaces it watches (tests/deploy/test_chart.py
     checks them against every API call the operator makes in the end-to-end tests). */}}
{{- define "disp-operator.namespacedRules" -}}
- apiGroups: ["disp.dev"]
  resources: ["purificationjobs"]
  verbs: ["list", "watch", "patch", "delete"]  # delete: policy.ttlSecondsAfterFinished
- apiGroups: ["disp.dev"]
  resources: ["purificationjobs/status"]
  verbs: ["patch"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if .Values.kueue.enabled }}
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["get", "create", "delete"]
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads/status"]
  verbs: ["update"]
{{- end }}
{{- end -}}

{{/* Reading S3 credentials: granted only by Roles, in the namespaces the operator may read them. */}}
{{- define "disp-operator.secretRules" -}}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end -}}

{{/* The namespaces whose Secrets the operator may read (see values.yaml, credentialNamespaces). */}}
{{- define "disp-operator.credentialNamespaces" -}}
{{- if .Values.watchNamespaces -}}
{{- join "," .Values.watchNamespaces -}}
{{- else -}}
{{- join "," .Values.credentialNamespaces -}}
{{- end -}}
{{- end -}}
