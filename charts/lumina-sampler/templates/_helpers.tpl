{{/*
Chart name, truncated to 63 chars (DNS label).
*/}}
{{- define "lumina-sampler.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, truncated to 63 chars.
*/}}
{{- define "lumina-sampler.fullname" -}}
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
Chart label value.
*/}}
{{- define "lumina-sampler.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Standard labels, on every object.
*/}}
{{- define "lumina-sampler.labels" -}}
helm.sh/chart: {{ include "lumina-sampler.chart" . }}
{{ include "lumina-sampler.selectorLabels" . }}
app.kubernetes.io/version: {{ include "lumina-sampler.imageTag" . | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: sampler
app.kubernetes.io/part-of: lumina-pipeline
{{- end }}

{{/*
Selector labels (immutable: never add to these).
*/}}
{{- define "lumina-sampler.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lumina-sampler.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
ServiceAccount name.
*/}}
{{- define "lumina-sampler.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lumina-sampler.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image tag: values or the chart's appVersion; "latest" is refused (the schema refuses it too).
*/}}
{{- define "lumina-sampler.imageTag" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag | toString }}
{{- if eq $tag "latest" }}
{{- fail "image.tag must be a pinned version, not \"latest\"" }}
{{- end }}
{{- $tag }}
{{- end }}

{{- define "lumina-sampler.image" -}}
{{- printf "%s:%s" .Values.image.repository (include "lumina-sampler.imageTag" .) }}
{{- end }}

{{/*
Name of the sampler-defaults ConfigMap.
*/}}
{{- define "lumina-sampler.configMapName" -}}
{{- printf "%s-defaults" (include "lumina-sampler.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Name of the model-cache PVC (existing or chart-created).
*/}}
{{- define "lumina-sampler.pvcName" -}}
{{- if .Values.modelCache.pvc.existingClaim }}
{{- .Values.modelCache.pvc.existingClaim }}
{{- else }}
{{- printf "%s-models" (include "lumina-sampler.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/*
Sampler defaults file content (YAML). Its checksum rolls the pods when it changes.
*/}}
{{- define "lumina-sampler.defaultsYaml" -}}
{{- with .Values.sampler -}}
steps: {{ int .steps }}
guidance_scale: {{ include "lumina-sampler.float" .guidance_scale }}
cfg_trunc: {{ include "lumina-sampler.float" .cfg_trunc }}
renorm: {{ include "lumina-sampler.float" .renorm }}
solver: {{ .solver | quote }}
teacache: {{ include "lumina-sampler.float" .teacache }}
max_batch: {{ int .max_batch }}
max_side: {{ int .max_side }}
queue_size: {{ int .queue_size }}
{{- range $key := list "height" "width" "max_steps" "max_prompt_chars" }}
{{- if not (kindIs "invalid" (index $.Values.sampler $key)) }}
{{ $key }}: {{ int (index $.Values.sampler $key) }}
{{- end }}
{{- end }}
{{- if not (kindIs "invalid" .batch_window_ms) }}
batch_window_ms: {{ include "lumina-sampler.float" .batch_window_ms }}
{{- end }}
{{- if not (kindIs "invalid" .micro_batch) }}
micro_batch: {{ .micro_batch }}
{{- end }}
{{- if not (kindIs "invalid" .system_prompt) }}
system_prompt: {{ .system_prompt | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A number written as a YAML float (4 -> 4.0), since values arrive as float64 and toYaml drops ".0".
*/}}
{{- define "lumina-sampler.float" -}}
{{- $f := float64 . -}}
{{- if eq $f (floor $f) }}{{ printf "%.1f" $f }}{{ else }}{{ $f }}{{ end -}}
{{- end }}

{{/*
Environment shared by the init container (fetch) and the server: model source, caches,
MLflow and S3 settings. Credentials only ever come from secretKeyRef.
*/}}
{{- define "lumina-sampler.commonEnv" -}}
- name: LUMINA_MODEL_SOURCE
  value: {{ .Values.model.source | quote }}
- name: LUMINA_MODEL_DIR
  value: {{ .Values.model.dir | quote }}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: HF_HOME
  value: /tmp/.cache/huggingface
- name: LUMINA_LOG_FORMAT
  value: {{ .Values.logging.format | quote }}
- name: LUMINA_LOG_LEVEL
  value: {{ .Values.logging.level | quote }}
{{- if eq .Values.logging.format "json" }}
- name: TQDM_DISABLE
  value: "1"
{{- end }}
{{- with .Values.mlflow.trackingUri }}
- name: MLFLOW_TRACKING_URI
  value: {{ . | quote }}
{{- end }}
{{- if .Values.mlflow.existingSecret }}
{{- $secret := .Values.mlflow.existingSecret }}
{{- $keys := dict "MLFLOW_TRACKING_USERNAME" .Values.mlflow.usernameKey "MLFLOW_TRACKING_PASSWORD" .Values.mlflow.passwordKey "MLFLOW_TRACKING_TOKEN" .Values.mlflow.tokenKey }}
{{- range $env := list "MLFLOW_TRACKING_USERNAME" "MLFLOW_TRACKING_PASSWORD" "MLFLOW_TRACKING_TOKEN" }}
{{- with index $keys $env }}
- name: {{ $env }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ . }}
      optional: true
{{- end }}
{{- end }}
{{- end }}
{{- with .Values.s3.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- if .Values.s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .Values.s3.existingSecret }}
      key: {{ .Values.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.s3.existingSecret }}
      key: {{ .Values.s3.secretAccessKeyKey }}
{{- end }}
{{- end }}

{{/*
Checks across values that the JSON schema cannot express.
*/}}
{{- define "lumina-sampler.validate" -}}
{{- if and (eq .Values.modelCache.type "pvc") (not .Values.modelCache.pvc.existingClaim) (not .Values.modelCache.pvc.create) }}
{{- fail "modelCache.type=pvc needs modelCache.pvc.existingClaim or modelCache.pvc.create=true" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must be <= autoscaling.maxReplicas" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (not (or .Values.autoscaling.targetCPUUtilizationPercentage .Values.autoscaling.targetMemoryUtilizationPercentage .Values.autoscaling.metrics)) }}
{{- fail "autoscaling.enabled needs at least one metric (targetCPUUtilizationPercentage, targetMemoryUtilizationPercentage or metrics)" }}
{{- end }}
{{- with .Values.sampler }}
{{- $maxSide := int .max_side }}
{{- range $key := list "height" "width" }}
{{- $v := index $.Values.sampler $key }}
{{- if and (not (kindIs "invalid" $v)) (gt (int $v) $maxSide) }}
{{- fail (printf "sampler.%s (%d) must be at most sampler.max_side (%d)" $key (int $v) $maxSide) }}
{{- end }}
{{- end }}
{{- if and (not (kindIs "invalid" .max_steps)) (gt (int .steps) (int .max_steps)) }}
{{- fail (printf "sampler.steps (%d) must be at most sampler.max_steps (%d)" (int .steps) (int .max_steps)) }}
{{- end }}
{{- end }}
{{- range .Values.extraVolumeMounts }}
{{- if has .mountPath (list $.Values.model.dir "/tmp" "/dev/shm" "/etc/lumina") }}
{{- fail (printf "extraVolumeMounts: %s is already mounted by the chart" .mountPath) }}
{{- end }}
{{- end }}
{{- end }}
