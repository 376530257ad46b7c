{{/* Names and labels. */}}
{{- define "disagg-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "disagg-operator.fullname" -}}
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

{{- define "disagg-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "disagg-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "disagg-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "disagg-operator.labels" -}}
helm.sh/chart: {{ include "disagg-operator.chart" . }}
{{ include "disagg-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: disagg
{{- end }}

{{- define "disagg-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "disagg-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "disagg-operator.peeringName" -}}
{{- default (include "disagg-operator.fullname" .) .Values.peering.name }}
{{- end }}

{{- define "disagg-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "disagg-operator.validate" -}}
{{- if and .Values.rbac.namespaced (not .Values.watchNamespaces) }}
{{- fail "rbac.namespaced=true needs watchNamespaces: the namespaces to grant the operator's Role in" }}
{{- end }}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.peering.enabled) }}
{{- fail "replicaCount > 1 needs peering.enabled=true, or every replica reconciles the same objects" }}
{{- end }}
{{- end }}

{{/*
The operator's RBAC rules: exactly disagg.rbac.RULES (tests/unit/test_chart.py compares them), in
three parts so the namespaced mode can put each where it belongs.
*/}}
{{- define "disagg-operator.rules.namespaced" -}}
- apiGroups: [disagg.dev]
  resources: [inferenceservices]
  verbs: [get, list, watch, patch]
- apiGroups: [disagg.dev]
  resources: [inferenceservices/status]
  verbs: [get, patch, update]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, update, patch, delete]
- apiGroups: [leaderworkerset.x-k8s.io]
  resources: [leaderworkersets]
  verbs: [get, list, watch, create, update, patch, delete]
- apiGroups: [""]
  resources: [services, serviceaccounts]
  verbs: [get, list, watch, create, update, patch, delete]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, list, watch, create, update, patch, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, update, patch, delete]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch, create, update, patch, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, patch, delete]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch, update]
{{- end }}

{{/* Cluster-scoped reads kopf makes even when it watches only some namespaces. */}}
{{- define "disagg-operator.rules.clusterScoped" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- end }}

{{/* kopf peering: ClusterKopfPeering cluster-wide, KopfPeering per namespace when namespaced. */}}
{{- define "disagg-operator.rules.peering" -}}
- apiGroups: [kopf.dev]
  resources: [clusterkopfpeerings, kopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}

{{/* The operator's arguments (ENTRYPOINT is `disagg run`). */}}
{{- define "disagg-operator.args" -}}
{{- if .Values.watchNamespaces }}
{{- range .Values.watchNamespaces }}
- {{ printf "--namespace=%v" (.) | quote }}
{{- end }}
{{- else }}
- --all-namespaces
{{- end }}
- {{ printf "--listen-host=%v" (.Values.operator.listenHost) | quote }}
- {{ printf "--liveness-port=%v" (.Values.operator.livenessPort) | quote }}
- {{ printf "--metrics-port=%v" (.Values.operator.metricsPort) | quote }}
- {{ printf "--workers=%v" (.Values.operator.workers) | quote }}
- {{ printf "--resync-seconds=%v" (.Values.operator.resyncSeconds) | quote }}
- {{ printf "--rollouts=%v" (.Values.operator.rollouts) | quote }}
- {{ printf "--autoscale-tick=%v" (.Values.autoscaling.tickSeconds) | quote }}
- {{ printf "--scale-down-window=%v" (.Values.autoscaling.scaleDownWindowSeconds) | quote }}
- {{ printf "--metrics-staleness=%v" (.Values.autoscaling.metricsStalenessSeconds) | quote }}
- {{ printf "--prometheus-rate-window=%v" (.Values.autoscaling.rateWindow) | quote }}
- {{ printf "--scrape-interval=%v" (.Values.autoscaling.scrapeIntervalSeconds) | quote }}
{{- if .Values.peering.enabled }}
- {{ printf "--peering=%v" (include "disagg-operator.peeringName" .) | quote }}
{{- end }}
{{- with .Values.prometheus }}
{{- if .url }}
- {{ printf "--prometheus-url=%v" (.url) | quote }}
- {{ printf "--prometheus-timeout=%v" (.timeoutSeconds) | quote }}
{{- if .tokenSecret.name }}
- {{ printf "--prometheus-token-file=/var/run/secrets/disagg/prometheus-token/%s" .tokenSecret.key | quote }}
{{- else if .tokenFile }}
- {{ printf "--prometheus-token-file=%v" (.tokenFile) | quote }}
{{- end }}
{{- if .caConfigMap.name }}
- {{ printf "--prometheus-ca-file=/var/run/secrets/disagg/prometheus-ca/%s" .caConfigMap.key | quote }}
{{- else if .caSecret.name }}
- {{ printf "--prometheus-ca-file=/var/run/secrets/disagg/prometheus-ca/%s" .caSecret.key | quote }}
{{- else if .caFile }}
- {{ printf "--prometheus-ca-file=%v" (.caFile) | quote }}
{{- end }}
{{- end }}
{{- end }}
- {{ printf "--metrics-scrapers=%s" (toJson .Values.networkPolicy.metricsScrapers) | quote }}
{{- if or .Values.acceleratorCatalog.accelerators .Values.acceleratorCatalog.existingConfigMap }}
- --accelerator-catalog=/etc/disagg/catalog/accelerators.yaml
{{- end }}
{{- if .Values.operator.verbose }}
- --verbose
{{- end }}
{{- range .Values.operator.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}
