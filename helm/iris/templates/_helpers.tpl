{{/* Names and labels. */}}
{{- define "iris.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "iris.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "gateway"). */}}
{{- define "iris.selector" -}}
app.kubernetes.io/name: {{ .ctx.Chart.Name }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The image of a tier running on `device`: (dict "ctx" $ "device" "cpu"). */}}
{{- define "iris.image" -}}
{{- $img := .ctx.Values.image -}}
{{- if eq .device "cuda" -}}{{- $img = .ctx.Values.cudaImage -}}{{- end -}}
{{- printf "%s:%s" $img.repository (default .ctx.Chart.AppVersion $img.tag) -}}
{{- end -}}

{{/* etcd's client endpoints, comma-separated. */}}
{{- define "iris.etcdEndpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- $name := include "iris.fullname" . -}}
{{- $eps := list -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $eps = append $eps (printf "http://%s-etcd-%d.%s-etcd-headless.%s.svc:2379" $name $i $name $.Release.Namespace) -}}
{{- end -}}
{{- join "," $eps -}}
{{- else -}}
{{- required "etcd.external.endpoints is required when etcd.enabled is false" (join "," .Values.etcd.external.endpoints) -}}
{{- end -}}
{{- end -}}

{{- define "iris.tokenSecret" -}}
{{- default (printf "%s-cluster-token" (include "iris.fullname" .)) .Values.clusterToken.existingSecret -}}
{{- end -}}

{{/* Arguments every member takes: addresses, etcd, the cluster, the token, models. */}}
{{- define "iris.memberArgs" -}}
- --grpc-addr=0.0.0.0:{{ .Values.ports.grpc }}
- --http-addr=0.0.0.0:{{ .Values.ports.http }}
- --advertise-addr=$(POD_IP):{{ .Values.ports.grpc }}
- --etcd={{ include "iris.etcdEndpoints" . }}
- --cluster={{ .Values.cluster.name }}
- --lease-ttl-s={{ .Values.cluster.leaseTtlSeconds }}
- --cluster-token-file=/etc/iris/token/token
{{- with .Values.tracing.otlpEndpoint }}
- --otlp-endpoint={{ . }}
{{- end }}
{{- if and (not .Values.etcd.enabled) .Values.etcd.external.tlsSecret }}
- --etcd-ca=/etc/iris/etcd-tls/ca.crt
- --etcd-cert=/etc/iris/etcd-tls/tls.crt
- --etcd-key=/etc/iris/etcd-tls/tls.key
{{- end }}
{{- range .Values.models }}
- --model={{ $.Values.weights.mountPath }}/{{ .path }}
{{- end }}
{{- end -}}

{{- define "iris.memberEnv" -}}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: RUST_LOG
  value: info
{{- end -}}

{{/* Probes on grpc.health.v1 (the member reports NOT_SERVING once it cannot serve). */}}
{{- define "iris.probes" -}}
startupProbe:
  grpc:
    port: {{ .Values.ports.grpc }}
  periodSeconds: 5
  failureThreshold: 120
readinessProbe:
  grpc:
    port: {{ .Values.ports.grpc }}
  periodSeconds: 5
  failureThreshold: 2
livenessProbe:
  grpc:
    port: {{ .Values.ports.grpc }}
  periodSeconds: 10
  failureThreshold: 6
{{- end -}}

{{/* A moment for endpoints to drop the pod before SIGTERM starts the drain. */}}
{{- define "iris.lifecycle" -}}
lifecycle:
  preStop:
    sleep:
      seconds: 5
{{- end -}}

{{- define "iris.ports" -}}
- name: grpc
  containerPort: {{ .Values.ports.grpc }}
- name: http
  containerPort: {{ .Values.ports.http }}
{{- end -}}

{{- define "iris.volumeMounts" -}}
- name: weights
  mountPath: {{ .Values.weights.mountPath }}
  readOnly: true
- name: cluster-token
  mountPath: /etc/iris/token
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if and (not .Values.etcd.enabled) .Values.etcd.external.tlsSecret }}
- name: etcd-tls
  mountPath: /etc/iris/etcd-tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "iris.volumes" -}}
- name: weights
{{- if .Values.weights.persistentVolumeClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.weights.persistentVolumeClaim }}
    readOnly: true
{{- else if .Values.weights.hostPath }}
  hostPath:
    path: {{ .Values.weights.hostPath }}
    type: Directory
{{- else }}
  {{- fail "set weights.persistentVolumeClaim or weights.hostPath" }}
{{- end }}
- name: cluster-token
  secret:
    secretName: {{ include "iris.tokenSecret" . }}
- name: tmp
  emptyDir: {}
{{- if and (not .Values.etcd.enabled) .Values.etcd.external.tlsSecret }}
- name: etcd-tls
  secret:
    secretName: {{ .Values.etcd.external.tlsSecret }}
{{- end }}
{{- end -}}

{{/* Resources, GPUs added: (dict "resources" .resources "gpus" N). */}}
{{- define "iris.resources" -}}
{{- $r := deepCopy .resources -}}
{{- if gt (int .gpus) 0 -}}
{{- $limits := default dict $r.limits -}}
{{- $_ := set $limits "nvidia.com/gpu" (int .gpus) -}}
{{- $_ := set $r "limits" $limits -}}
{{- end -}}
{{- toYaml $r -}}
{{- end -}}

{{/* Pod-level fields every member shares. */}}
{{- define "iris.podSpecCommon" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
enableServiceLinks: false
automountServiceAccountToken: false
{{- end -}}
