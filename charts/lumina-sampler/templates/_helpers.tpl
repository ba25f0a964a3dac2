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
app.kubernetes.io/version: {{ include "lumina-sampler.imageTag" . | splitList "@" | first | trunc 63 | trimSuffix "-" | quote }}
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
Labels of the `helm test` pod: its own app.kubernetes.io/name, so that the Service, PDB and
NetworkPolicy selectors never pick it.
*/}}
{{- define "lumina-sampler.testSelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-test" (include "lumina-sampler.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "lumina-sampler.testLabels" -}}
helm.sh/chart: {{ include "lumina-sampler.chart" . }}
{{ include "lumina-sampler.testSelectorLabels" . }}
app.kubernetes.io/version: {{ include "lumina-sampler.imageTag" . | splitList "@" | first | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: test
app.kubernetes.io/part-of: lumina-pipeline
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

{{/*
Image reference: repository@digest when image.digest is set, else repository:tag (a tag may carry its
own "@sha256:..." digest).
*/}}
{{- define "lumina-sampler.image" -}}
{{- $tag := include "lumina-sampler.imageTag" . }}
{{- if .Values.image.digest }}
{{- if contains "@" $tag }}
{{- fail "set the digest in image.digest or in image.tag (tag@sha256:...), not both" }}
{{- end }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
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
{{- range $key := list "height" "width" "max_steps" "max_prompt_chars" "max_body_bytes" "max_input_image_bytes" "max_input_pixels" }}
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
Environment shared by the init container (fetch) and the server: model source, caches, logging,
MLflow and S3 settings (no credentials: see lumina-sampler.fetchCredentials).
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
{{- end }}

{{/*
Credentials for fetching the weights (MLflow, S3), only from secretKeyRef: in the fetch init
container, and in the server only when it fetches itself (model.fetch.enabled false); once the init
container has filled the cache the server resolves the source from its marker, without network.
*/}}
{{- define "lumina-sampler.fetchCredentials" -}}
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
A Kubernetes quantity (500m, 2, 16Gi, 1.5G, 1e3 is not supported) in bytes / units, as a float64.
*/}}
{{- define "lumina-sampler.quantity" -}}
{{- $q := toString . }}
{{- $num := regexFind "^[0-9]+(\\.[0-9]+)?" $q }}
{{- $suffix := trimPrefix $num $q }}
{{- $mult := dict "" 1.0 "m" 0.001 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0 }}
{{- if or (not $num) (not (hasKey $mult $suffix)) }}
{{- fail (printf "cannot read the quantity %q" $q) }}
{{- end }}
{{- mulf (float64 $num) (get $mult $suffix) }}
{{- end }}

{{/*
ephemeral-storage the pod's disk-backed emptyDirs may fill (model cache emptyDir + /tmp) plus
ephemeralStorage.overhead, in Mi (rounded up); empty when ephemeralStorage.enabled is false.
*/}}
{{- define "lumina-sampler.ephemeralStorage" -}}
{{- if .Values.ephemeralStorage.enabled }}
{{- $total := include "lumina-sampler.quantity" (default 0 .Values.ephemeralStorage.overhead) | float64 }}
{{- $total = addf $total (include "lumina-sampler.quantity" .Values.tmp.sizeLimit | float64) }}
{{- if eq .Values.modelCache.type "emptyDir" }}
{{- $total = addf $total (include "lumina-sampler.quantity" .Values.modelCache.emptyDir.sizeLimit | float64) }}
{{- end }}
{{- $mi := ceil (divf $total 1048576.0) | int64 }}
{{- if eq (mod $mi 1024) 0 }}{{ printf "%dGi" (div $mi 1024) }}{{ else }}{{ printf "%dMi" $mi }}{{ end }}
{{- end }}
{{- end }}

{{/*
Server resources: values.resources, plus the GPU limit and the computed ephemeral-storage (an explicit
resources.*.ephemeral-storage is kept, and checked against the emptyDir sizeLimits).
*/}}
{{- define "lumina-sampler.serverResources" -}}
{{- $resources := deepCopy (default dict .Values.resources) }}
{{- $requests := default dict $resources.requests }}
{{- $limits := default dict $resources.limits }}
{{- $eph := include "lumina-sampler.ephemeralStorage" . }}
{{- if $eph }}
{{- $need := include "lumina-sampler.quantity" $eph | float64 }}
{{- range $kind, $map := dict "requests" $requests "limits" $limits }}
{{- if hasKey $map "ephemeral-storage" }}
{{- if lt (include "lumina-sampler.quantity" (index $map "ephemeral-storage") | float64) $need }}
{{- fail (printf "resources.%s.ephemeral-storage (%v) is smaller than the emptyDir sizeLimits + ephemeralStorage.overhead (%s)" $kind (index $map "ephemeral-storage") $eph) }}
{{- end }}
{{- end }}
{{- end }}
{{- if not (hasKey $requests "ephemeral-storage") }}
{{- $_ := set $requests "ephemeral-storage" $eph }}
{{- end }}
{{- if not (hasKey $limits "ephemeral-storage") }}
{{- /* never below an explicit request */}}
{{- $request := index $requests "ephemeral-storage" }}
{{- $_ := set $limits "ephemeral-storage" (ternary $request $eph (gt (include "lumina-sampler.quantity" $request | float64) $need)) }}
{{- end }}
{{- end }}
{{- if .Values.gpu.enabled }}
{{- $_ := set $limits .Values.gpu.resourceName (.Values.gpu.count | int) }}
{{- end }}
{{- if $requests }}{{ $_ := set $resources "requests" $requests }}{{ end }}
{{- if $limits }}{{ $_ := set $resources "limits" $limits }}{{ end }}
{{- toYaml $resources }}
{{- end }}

{{/*
Init container resources: model.fetch.resources plus the computed ephemeral-storage (it writes the
model cache emptyDir).
*/}}
{{- define "lumina-sampler.fetchResources" -}}
{{- $resources := deepCopy (default dict .Values.model.fetch.resources) }}
{{- with include "lumina-sampler.ephemeralStorage" . }}
{{- $requests := default dict $resources.requests }}
{{- $limits := default dict $resources.limits }}
{{- if not (hasKey $requests "ephemeral-storage") }}{{ $_ := set $requests "ephemeral-storage" . }}{{ end }}
{{- if not (hasKey $limits "ephemeral-storage") }}{{ $_ := set $limits "ephemeral-storage" . }}{{ end }}
{{- $_ := set $resources "requests" $requests }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/*
Startup budget in seconds: the download (model.fetch.budgetSeconds when the init container runs) and
the startup probe (initialDelaySeconds + periodSeconds * failureThreshold).
*/}}
{{- define "lumina-sampler.startupBudget" -}}
{{- $p := .Values.probes.startup }}
{{- $fetch := ternary (int (default 0 .Values.model.fetch.budgetSeconds)) 0 .Values.model.fetch.enabled }}
{{- add $fetch (int $p.initialDelaySeconds) (mul (int $p.periodSeconds) (int $p.failureThreshold)) }}
{{- end }}

{{/*
The fewest pods the workload runs: minReplicas of the HPA / KEDA, else replicaCount.
*/}}
{{- define "lumina-sampler.minReplicas" -}}
{{- if .Values.keda.enabled }}{{ int .Values.keda.minReplicaCount }}
{{- else if .Values.autoscaling.enabled }}{{ int .Values.autoscaling.minReplicas }}
{{- else }}{{ int .Values.replicaCount }}{{ end }}
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
{{- if has (trimSuffix "/" .mountPath) (list (trimSuffix "/" $.Values.model.dir) "/tmp" "/dev/shm" "/etc/lumina") }}
{{- fail (printf "extraVolumeMounts: %s is already mounted by the chart" .mountPath) }}
{{- end }}
{{- end }}
{{- $seen := dict }}
{{- range .Values.extraEnv }}
{{- $key := upper .name }}
{{- if hasKey $seen $key }}
{{- fail (printf "extraEnv: %s is set twice (names are compared in any letter case)" .name) }}
{{- end }}
{{- $_ := set $seen $key true }}
{{- end }}
{{- if and .Values.autoscaling.enabled .Values.keda.enabled }}
{{- fail "autoscaling.enabled and keda.enabled are exclusive: the KEDA ScaledObject makes its own HPA" }}
{{- end }}
{{- if and .Values.keda.enabled (gt (int .Values.keda.minReplicaCount) (int .Values.keda.maxReplicaCount)) }}
{{- fail "keda.minReplicaCount must be <= keda.maxReplicaCount" }}
{{- end }}
{{- $minReplicas := include "lumina-sampler.minReplicas" . | int }}
{{- $maxReplicas := $minReplicas }}
{{- if .Values.keda.enabled }}{{ $maxReplicas = int .Values.keda.maxReplicaCount }}
{{- else if .Values.autoscaling.enabled }}{{ $maxReplicas = int .Values.autoscaling.maxReplicas }}{{ end }}
{{- with .Values.modelCache }}
{{- if and (eq .type "pvc") (or (has "ReadWriteOnce" .pvc.accessModes) (has "ReadWriteOncePod" .pvc.accessModes)) (not (has "ReadWriteMany" .pvc.accessModes)) (not (has "ReadOnlyMany" .pvc.accessModes)) (gt $maxReplicas 1) }}
{{- fail (printf "a ReadWriteOnce model cache claim serves one pod: use modelCache.pvc.accessModes [ReadWriteMany] for up to %d replicas (replicaCount, autoscaling or keda)" $maxReplicas) }}
{{- end }}
{{- end }}
{{- with .Values.podDisruptionBudget }}
{{- if and .enabled (not (kindIs "invalid" .minAvailable)) (gt $minReplicas 0) }}
{{- $min := .minAvailable }}
{{- if kindIs "string" $min }}
{{- if ge (trimSuffix "%" $min | int) 100 }}
{{- fail "podDisruptionBudget.minAvailable 100% would block every voluntary eviction" }}
{{- end }}
{{- else if ge (int $min) $minReplicas }}
{{- fail (printf "podDisruptionBudget.minAvailable (%d) must be below the replica count (%d), or no node could be drained" (int $min) $minReplicas) }}
{{- end }}
{{- end }}
{{- end }}
{{- $grace := int .Values.terminationGracePeriodSeconds }}
{{- $stop := add (int .Values.shutdown.preStopSleepSeconds) (int .Values.shutdown.drainSeconds) }}
{{- if lt $grace $stop }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be >= shutdown.preStopSleepSeconds + shutdown.drainSeconds (%d)" $grace $stop) }}
{{- end }}
{{- $budget := include "lumina-sampler.startupBudget" . | int }}
{{- if lt (int .Values.progressDeadlineSeconds) $budget }}
{{- fail (printf "progressDeadlineSeconds (%d) must be >= the startup budget (%d s: model.fetch.budgetSeconds + the startup probe's initialDelaySeconds + periodSeconds * failureThreshold)" (int .Values.progressDeadlineSeconds) $budget) }}
{{- end }}
{{- if .Values.ephemeralStorage.enabled }}
{{- if kindIs "invalid" .Values.tmp.sizeLimit }}
{{- fail "tmp.sizeLimit must be set while ephemeralStorage.enabled (the ephemeral-storage budget counts it)" }}
{{- end }}
{{- if and (eq .Values.modelCache.type "emptyDir") (kindIs "invalid" .Values.modelCache.emptyDir.sizeLimit) }}
{{- fail "modelCache.emptyDir.sizeLimit must be set while ephemeralStorage.enabled (the ephemeral-storage budget counts it)" }}
{{- end }}
{{- end }}
{{- $memLimit := dig "limits" "memory" "" (default dict .Values.resources) }}
{{- if and $memLimit (not (kindIs "invalid" .Values.shm.sizeLimit)) }}
{{- if le (include "lumina-sampler.quantity" $memLimit | float64) (include "lumina-sampler.quantity" .Values.shm.sizeLimit | float64) }}
{{- fail (printf "resources.limits.memory (%s) must be larger than shm.sizeLimit (%s): /dev/shm is memory" $memLimit .Values.shm.sizeLimit) }}
{{- end }}
{{- end }}
{{- end }}
