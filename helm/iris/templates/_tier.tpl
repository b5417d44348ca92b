{{/* A stateless tier's Deployment, Service, HPA and PDB:
     (dict "ctx" $ "component" "encoder" "binary" "iris-encoder" "v" .Values.encoder). */}}
{{- define "iris.tier" -}}
{{- $ctx := .ctx -}}
{{- $v := .v -}}
{{- $name := printf "%s-%s" (include "iris.fullname" $ctx) .component -}}
{{- $device := default "cpu" $v.device -}}
{{- $sel := dict "ctx" $ctx "component" .component -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $name }}
  labels:
    {{- include "iris.labels" $ctx | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  {{- if not $v.hpa.enabled }}
  replicas: {{ $v.replicas }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "iris.selector" $sel | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "iris.selector" $sel | nindent 8 }}
        iris.dev/member: "true"
    spec:
      {{- include "iris.podSpecCommon" $ctx | nindent 6 }}
      terminationGracePeriodSeconds: {{ $ctx.Values.terminationGracePeriodSeconds }}
      containers:
        - name: {{ .component }}
          image: {{ include "iris.image" (dict "ctx" $ctx "device" $device) }}
          imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
          command: ["/usr/local/bin/{{ .binary }}"]
          args:
            {{- include "iris.memberArgs" $ctx | nindent 12 }}
            {{- if ne $device "cpu" }}
            - --device={{ $device }}
            {{- end }}
            {{- with $v.extraArgs }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          env:
            {{- include "iris.memberEnv" $ctx | nindent 12 }}
          ports:
            {{- include "iris.ports" $ctx | nindent 12 }}
          {{- include "iris.probes" $ctx | nindent 10 }}
          {{- include "iris.lifecycle" $ctx | nindent 10 }}
          resources:
            {{- include "iris.resources" (dict "resources" $v.resources "gpus" (default 0 $v.gpus)) | nindent 12 }}
          securityContext:
            {{- toYaml $ctx.Values.containerSecurityContext | nindent 12 }}
          volumeMounts:
            {{- include "iris.volumeMounts" $ctx | nindent 12 }}
      volumes:
        {{- include "iris.volumes" $ctx | nindent 8 }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ $name }}
  labels:
    {{- include "iris.labels" $ctx | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  {{- if eq .component "gateway" }}
  type: {{ $ctx.Values.gateway.service.type }}
  {{- else }}
  clusterIP: None
  {{- end }}
  selector:
    {{- include "iris.selector" $sel | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $ctx.Values.ports.grpc }}
      targetPort: grpc
    - name: http
      port: {{ $ctx.Values.ports.http }}
      targetPort: http
{{- if $v.hpa.enabled }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ $name }}
  labels:
    {{- include "iris.labels" $ctx | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ $name }}
  minReplicas: {{ $v.hpa.minReplicas }}
  maxReplicas: {{ $v.hpa.maxReplicas }}
  metrics:
    {{- if and $v.hpa.queueDepth $v.hpa.queueDepth.enabled }}
    - type: Pods
      pods:
        metric:
          name: iris_encoder_queue_depth
        target:
          type: AverageValue
          averageValue: {{ $v.hpa.queueDepth.averageValue | quote }}
    {{- end }}
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $v.hpa.targetCPUUtilizationPercentage }}
{{- end }}
{{- if $ctx.Values.podDisruptionBudget.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ $name }}
  labels:
    {{- include "iris.labels" $ctx | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  maxUnavailable: 1
  selector:
    matchLabels:
      {{- include "iris.selector" $sel | nindent 6 }}
{{- end }}
{{- end -}}
