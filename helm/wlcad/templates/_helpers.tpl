{{- /* Shared pieces of every object: labels, selectors, images, security contexts and probes, so each
Deployment states only what is its own. */ -}}

{{- define "wlcad.labels" -}}
app.kubernetes.io/name: wlcad
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- /* Selector of one component's pods: (list $ "gateway"). */ -}}
{{- define "wlcad.selector" -}}
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- /* An image reference: repository:tag, or repository@digest when a digest is given (tag kept for
people reading it). (dict "image" .Values.image) */ -}}
{{- define "wlcad.imageRef" -}}
{{- if .image.digest -}}
{{ .image.repository }}@{{ .image.digest }}
{{- else -}}
{{ .image.repository }}:{{ .image.tag }}
{{- end -}}
{{- end -}}

{{- define "wlcad.image" -}}
{{ include "wlcad.imageRef" (dict "image" .Values.image) }}
{{- end -}}

{{- /* checkov waivers for a pod template: named checks with their reasons (values: checkovWaivers), and
the digest check while an image is pinned by tag only; checkov reads them on the object itself, not the
pod template. (dict "root" $ "digest" "<digest or empty>" ["extra" (dict CHECK REASON)]) */ -}}
{{- define "wlcad.waivers" -}}
{{- $n := 0 -}}
{{- range $check, $reason := merge (deepCopy (.extra | default dict)) .root.Values.checkovWaivers }}
{{- $n = add1 $n }}
checkov.io/skip{{ $n }}: {{ printf "%s=%s" $check $reason | quote }}
{{- end }}
{{- if not .digest }}
{{- $n = add1 $n }}
checkov.io/skip{{ $n }}: {{ "CKV_K8S_43=image pinned by tag only: set the image's digest value for production" | quote }}
{{- end }}
{{- end -}}

{{- /* Pod-level security: a numeric non-root UID/GID, RuntimeDefault seccomp. */ -}}
{{- define "wlcad.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.security.runAsUser }}
runAsGroup: {{ .Values.security.runAsGroup }}
fsGroup: {{ .Values.security.runAsGroup }}
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{- /* Container-level security: read-only root (writes go to an emptyDir at /tmp), no privilege
escalation, every capability dropped. */ -}}
{{- define "wlcad.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.security.runAsUser }}
runAsGroup: {{ .Values.security.runAsGroup }}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities: {drop: [ALL]}
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{- /* Pod spec fields every wlcad pod shares. */ -}}
{{- define "wlcad.podCommon" -}}
automountServiceAccountToken: false
enableServiceLinks: false
securityContext: {{- include "wlcad.podSecurityContext" . | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- /* Scheduling of one component: (dict "scheduling" .Values.gateway) */ -}}
{{- define "wlcad.scheduling" -}}
{{- with .scheduling.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .scheduling.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .scheduling.affinity }}
affinity: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- /* gRPC health probes (grpc.health.v1, overall status) on one port: startup allows a slow model
load, then liveness restarts a wedged process and readiness takes it out of DNS. (dict "port" N "probes" .Values.probes) */ -}}
{{- define "wlcad.grpcProbes" -}}
startupProbe:
  grpc: {port: {{ .port }}}
  periodSeconds: {{ .probes.startup.periodSeconds }}
  failureThreshold: {{ .probes.startup.failureThreshold }}
  timeoutSeconds: {{ .probes.timeoutSeconds }}
livenessProbe:
  grpc: {port: {{ .port }}}
  periodSeconds: {{ .probes.liveness.periodSeconds }}
  failureThreshold: {{ .probes.liveness.failureThreshold }}
  timeoutSeconds: {{ .probes.timeoutSeconds }}
readinessProbe:
  grpc: {port: {{ .port }}}
  periodSeconds: {{ .probes.readiness.periodSeconds }}
  failureThreshold: {{ .probes.readiness.failureThreshold }}
  timeoutSeconds: {{ .probes.timeoutSeconds }}
{{- end -}}

{{- /* The name of the Secret holding the gateway's accepted token hashes (key "tokens"). */ -}}
{{- define "wlcad.gatewayTokenSecret" -}}
{{- .Values.gateway.existingTokenSecret | default (printf "%s-gateway-tokens" .Release.Name) -}}
{{- end -}}

{{- /* A capability's in-cluster DNS name (its headless Service). (list $ name) */ -}}
{{- define "wlcad.capabilityHost" -}}
{{- $root := index . 0 -}}
{{- printf "%s-%s.%s.svc.%s" $root.Release.Name (index . 1) $root.Release.Namespace $root.Values.clusterDomain -}}
{{- end -}}

