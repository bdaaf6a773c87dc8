{{- define "wlcad.labels" -}}
app.kubernetes.io/name: wlcad
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}
{{- define "wlcad.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}
