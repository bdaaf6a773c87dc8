{{- /* HorizontalPodAutoscaler of one component: CPU utilisation (of its requests), and, where
queueDepthPerPod > 0, the average wlcad_queue_depth per pod as a Pods metric (needs a custom-metrics
adapter). (dict "root" $ "name" "gateway" "autoscaling" .Values.gateway.autoscaling) */ -}}
{{- define "wlcad.hpa" -}}
{{- if .autoscaling.enabled }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ .root.Release.Name }}-{{ .name }}
  namespace: {{ .root.Release.Namespace }}
  labels: {{- include "wlcad.labels" .root | nindent 4 }}
    app.kubernetes.io/component: {{ .name }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ .root.Release.Name }}-{{ .name }}
  minReplicas: {{ .autoscaling.minReplicas }}
  maxReplicas: {{ .autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target: {type: Utilization, averageUtilization: {{ .autoscaling.targetCPUUtilizationPercentage }}}
    {{- if gt (int (.autoscaling.queueDepthPerPod | default 0)) 0 }}
    - type: Pods
      pods:
        metric: {name: wlcad_queue_depth}
        target: {type: AverageValue, averageValue: {{ .autoscaling.queueDepthPerPod | quote }}}
    {{- end }}
{{- end }}
{{- end -}}

{{- /* PodDisruptionBudget of one component: a drain or upgrade takes at most maxUnavailable pods at
once. (dict "root" $ "name" "gateway" "pdb" .Values.gateway.pdb) */ -}}
{{- define "wlcad.pdb" }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ .root.Release.Name }}-{{ .name }}
  namespace: {{ .root.Release.Namespace }}
  labels: {{- include "wlcad.labels" .root | nindent 4 }}
    app.kubernetes.io/component: {{ .name }}
spec:
  maxUnavailable: {{ .pdb.maxUnavailable }}
  selector:
    matchLabels: {{- include "wlcad.selector" (list .root .name) | nindent 6 }}
{{- end -}}
