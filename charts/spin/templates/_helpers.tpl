{{/*
Names and labels shared by every template. Kubernetes names and label values are limited to 63
characters, so every name is cut to 63 (and a trailing "-" left by the cut dropped).
*/}}

{{/* The chart name (app.kubernetes.io/name). */}}
{{- define "spin.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The full name: the release name, prefixed with the chart name unless it already contains it. */}}
{{- define "spin.fullname" -}}
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

{{/*
The full name with a suffix, the full name cut first so that the suffix always survives the 63-character
limit: two objects with different suffixes never end up with one name. Call with (list . "-suffix").
*/}}
{{- define "spin.suffixed" -}}
{{- $suffix := index . 1 }}
{{- $base := include "spin.fullname" (index . 0) | trunc (int (sub 63 (len $suffix))) | trimSuffix "-" }}
{{- printf "%s%s" $base $suffix }}
{{- end }}

{{/* The controller's Deployment, ServiceMonitor and (Cluster)Role(Binding) name. */}}
{{- define "spin.controllerName" -}}
{{- include "spin.suffixed" (list . "-controller") }}
{{- end }}

{{/* The metrics Service. */}}
{{- define "spin.metricsName" -}}
{{- include "spin.suffixed" (list . "-controller-metrics") }}
{{- end }}

{{/* The Role that lets the controller hold its leader Lease in the release namespace. */}}
{{/* The ClusterRole (and its binding) that reads the SpinRun CRD when the rest is a namespaced Role. */}}
{{- define "spin.crdReaderName" -}}
{{- include "spin.suffixed" (list . "-controller-crd") }}
{{- end }}

{{/* The ClusterRole that reads Secrets, bound in each of tenantNamespaces. */}}
{{- define "spin.secretsReaderName" -}}
{{- include "spin.suffixed" (list . "-controller-secrets") }}
{{- end }}

{{/* The users' ClusterRoles, aggregated into the built-in edit / admin and view roles. */}}
{{- define "spin.userRoleName" -}}
{{- include "spin.suffixed" (list (index . 0) (printf "-%s" (index . 1))) }}
{{- end }}

{{- define "spin.leaderElectionName" -}}
{{- include "spin.suffixed" (list . "-controller-leader-election") }}
{{- end }}

{{/* The controller's ServiceAccount. */}}
{{- define "spin.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "spin.controllerName" .) .Values.serviceAccount.name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- required "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The chart label value: name-version. */}}
{{- define "spin.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the controller's pods; fixed for a release's lifetime (a selector is immutable). */}}
{{- define "spin.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spin.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/component: controller
{{- end }}

{{/* The standard labels of every object of the chart. */}}
{{- define "spin.labels" -}}
helm.sh/chart: {{ include "spin.chart" . }}
{{ include "spin.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: spin-k8s
{{- end }}

{{/* The controller image: the tag defaults to the chart's appVersion. */}}
{{- define "spin.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Leader election is forced on with more than one replica: two reconcilers at once would race. */}}
{{- define "spin.leaderElect" -}}
{{- if or (gt (int .Values.replicas) 1) .Values.leaderElection.enabled }}true{{ else }}false{{ end }}
{{- end }}

{{/* Whether the cluster serves the prometheus-operator ServiceMonitor API. */}}
{{- define "spin.serviceMonitorServed" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor" }}true{{ end }}
{{- end }}
