#!/usr/bin/env python3
"""Checks the Helm chart (helm/iris) as a reviewer would, on the manifests `helm
template` renders for each values file under helm/iris/ci/:

- `helm lint` passes; every manifest validates against the Kubernetes API schemas
  (kubernetes-validate, strict) of the oldest version the chart supports (custom
  resources aside), and any failure of the validator fails the check;
- every Deployment and StatefulSet is covered by a PodDisruptionBudget;
- every container of every workload has resources and the restricted security context
  (non-root, read-only root, no privilege escalation, no capabilities), every
  long-running one probes (gRPC health for Iris members), and members get a preStop and
  a grace period for their drain;
- each decoder group is one StatefulSet whose pods are its ranks (rank = pod index,
  collectives advertised at the pod's headless name, GPUs per rank as asked);
- the NetworkPolicies admit only the gateway from outside; a tier's gRPC only from the
  gateway (a decoder's also from its group's ranks), metrics only from the monitoring
  namespaces, etcd only from the release's members;
- values that ask for them give them: external etcd with TLS, HPAs on the encoder's
  queue depth, an Ingress, a ServiceMonitor.

Usage: check_chart.py --helm HELM --validate KUBERNETES_VALIDATE [--chart helm/iris]
"""
import argparse
import os
import subprocess
import sys

import yaml

KUBE_VERSION = "1.30.0"
MEMBERS = {"gateway", "encoder", "connector", "decoder"}
# Custom resources, validated by their operators' CRDs, not by the Kubernetes schemas.
CUSTOM_API_VERSIONS = {"monitoring.coreos.com/v1"}


def fail(msg):
    print(f"chart check FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def render(helm, chart, values):
    out = subprocess.run(
        [helm, "template", "rel", chart, "-f", values, "--namespace", "vlm"],
        check=True, capture_output=True, text=True,
    ).stdout
    return out, [d for d in yaml.safe_load_all(out) if d]


def component(doc):
    return doc["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def pod_spec(doc):
    if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
        return doc["spec"]["template"]["spec"]
    return None


def check_disruption_budgets(docs, where):
    """Every long-running workload's pods are covered by a PodDisruptionBudget."""
    budgets = [d["spec"]["selector"]["matchLabels"] for d in docs if d["kind"] == "PodDisruptionBudget"]
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        labels = d["spec"]["template"]["metadata"].get("labels", {})
        if not any(all(labels.get(k) == v for k, v in b.items()) for b in budgets):
            fail(f"{where}: {d['kind']}/{d['metadata']['name']} has no PodDisruptionBudget")


def check_containers(docs, where):
    for d in docs:
        spec = pod_spec(d)
        if spec is None:
            continue
        name = f"{where}: {d['kind']}/{d['metadata']['name']}"
        psc = spec.get("securityContext", {})
        if not psc.get("runAsNonRoot") or psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            fail(f"{name}: pod security context {psc}")
        for c in spec["containers"]:
            cn = f"{name}/{c['name']}"
            res = c.get("resources", {})
            if not res.get("requests") or not res.get("limits"):
                fail(f"{cn}: no requests and limits ({res})")
            sc = c.get("securityContext", {})
            want = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True}
            if any(sc.get(k) != v for k, v in want.items()) or sc.get("capabilities", {}).get("drop") != ["ALL"]:
                fail(f"{cn}: security context {sc}")
            if d["kind"] == "Job":
                continue
            for p in ("startupProbe", "readinessProbe", "livenessProbe"):
                if p not in c:
                    fail(f"{cn}: no {p}")
            if component(d) in MEMBERS:
                for p in ("readinessProbe", "livenessProbe"):
                    if c[p].get("grpc", {}).get("port") != 50051:
                        fail(f"{cn}: {p} is not gRPC health on the gRPC port: {c[p]}")
                if "preStop" not in c.get("lifecycle", {}):
                    fail(f"{cn}: no preStop")
                if spec.get("terminationGracePeriodSeconds", 30) < 60:
                    fail(f"{name}: grace period {spec.get('terminationGracePeriodSeconds')} too short to drain")
                mounts = {m["name"]: m for m in c["volumeMounts"]}
                if not mounts["weights"].get("readOnly"):
                    fail(f"{cn}: weights mounted writable")


def args_of(doc):
    return doc["spec"]["template"]["spec"]["containers"][0]["args"]


def check_groups(docs, groups, tp, gpus, where):
    sts = [d for d in docs if d["kind"] == "StatefulSet" and component(d) == "decoder"]
    if len(sts) != groups:
        fail(f"{where}: {len(sts)} decoder StatefulSets for {groups} groups")
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    for i, s in enumerate(sorted(sts, key=lambda d: d["metadata"]["name"])):
        name = s["metadata"]["name"]
        if not name.endswith(f"-decoder-g{i}") or s["spec"]["replicas"] != tp:
            fail(f"{where}: {name}: {s['spec']['replicas']} ranks, want group g{i} of {tp}")
        if s["spec"]["serviceName"] not in services:
            fail(f"{where}: {name}'s headless service is missing")
        args = args_of(s)
        if f"--tp={tp}" not in args:
            fail(f"{where}: {name}: {args}")
        c = s["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in c["env"]}
        if tp > 1:
            rank = env.get("IRIS_RANK", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
            if rank != "metadata.labels['apps.kubernetes.io/pod-index']":
                fail(f"{where}: {name}: the rank is not the pod's index ({rank})")
            adv = [a for a in args if a.startswith("--tp-advertise=")]
            if adv != [f"--tp-advertise=$(POD_NAME).{s['spec']['serviceName']}.vlm.svc:29500"]:
                fail(f"{where}: {name}: collectives advertised at {adv}")
            if f"--group=g{i}" not in args:
                fail(f"{where}: {name}: no --group=g{i}")
            if "--follower-health-addr=0.0.0.0:50051" not in args:
                fail(f"{where}: {name}: its ranks above 0 answer no probe")
        got = c["resources"].get("limits", {}).get("nvidia.com/gpu", 0)
        if got != gpus:
            fail(f"{where}: {name}: {got} GPUs a rank, want {gpus}")


def peers(rule):
    return rule.get("from", [])


def check_network(docs, where, etcd):
    pols = {d["metadata"]["name"].removeprefix("rel-iris-"): d for d in docs if d["kind"] == "NetworkPolicy"}
    want = {"gateway", "encoder", "connector", "decoder"} | ({"etcd"} if etcd else set())
    if set(pols) != want:
        fail(f"{where}: NetworkPolicies {sorted(pols)}, want {sorted(want)}")
    gw = pols["gateway"]["spec"]["ingress"]
    if len(gw) != 1 or peers(gw[0]) or {p["port"] for p in gw[0]["ports"]} != {"grpc", "http"}:
        fail(f"{where}: the gateway's policy {gw}")
    for tier in ("encoder", "connector", "decoder"):
        for rule in pols[tier]["spec"]["ingress"]:
            ports = {p["port"] for p in rule["ports"]}
            for peer in peers(rule):
                if "namespaceSelector" in peer:
                    if ports != {"http"}:
                        fail(f"{where}: {tier}: a namespace reaches {ports}")
                    continue
                comp = peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")
                if comp == "gateway" and ports == {"grpc"}:
                    continue
                if tier == "decoder" and comp == "decoder" and ports <= {"tp", "grpc"}:
                    continue
                fail(f"{where}: {tier} admits {peer} on {ports}")
            if not peers(rule):
                fail(f"{where}: {tier} admits anyone on {ports}")
    if etcd:
        for rule in pols["etcd"]["spec"]["ingress"]:
            for peer in peers(rule):
                labels = peer.get("podSelector", {}).get("matchLabels", {})
                if labels.get("iris.dev/member") != "true" and labels.get("app.kubernetes.io/component") != "etcd":
                    fail(f"{where}: etcd admits {peer}")
            if not peers(rule):
                fail(f"{where}: etcd admits anyone")
        # Every member's pods carry the label etcd admits.
        for d in docs:
            if component(d) in MEMBERS | {"registry"} and pod_spec(d) is not None:
                if d["spec"]["template"]["metadata"]["labels"].get("iris.dev/member") != "true":
                    fail(f"{where}: {d['metadata']['name']} cannot reach etcd")


def check_images(rendered):
    """The container files copy every binary Cargo builds, and every command the chart
    runs is one of them."""
    import re

    cargo = open("services/iris/Cargo.toml").read()
    bins = set(re.findall(r'\[\[bin\]\]\s*name = "([^"]+)"', cargo))
    for f in ("deploy/Dockerfile", "deploy/Dockerfile.cuda"):
        text = open(f).read()
        m = re.search(r"for b in ([^;]+);", text)
        if not m or set(m.group(1).split()) != bins:
            fail(f"{f} copies {m.group(1).split() if m else None}, Cargo builds {sorted(bins)}")
        if "USER 10001:10001" not in text:
            fail(f"{f}: the image does not run as the chart's non-root user")
    for name, docs in rendered.items():
        for d in docs:
            spec = pod_spec(d)
            for c in (spec or {}).get("containers", []):
                cmd = c.get("command", [""])[0]
                if component(d) == "etcd":
                    continue
                if not cmd.startswith("/usr/local/bin/") or cmd.rsplit("/", 1)[1] not in bins:
                    fail(f"{name}: {d['metadata']['name']} runs {cmd}, not one of {sorted(bins)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--helm", required=True)
    ap.add_argument("--validate", required=True)
    ap.add_argument("--chart", default="helm/iris")
    a = ap.parse_args()
    subprocess.run([a.helm, "lint", a.chart, "--set", "weights.hostPath=/models"], check=True)
    ci = os.path.join(a.chart, "ci")
    rendered = {}
    for f in sorted(os.listdir(ci)):
        path = os.path.join(ci, f)
        text, docs = render(a.helm, a.chart, path)
        subprocess.run([a.helm, "lint", a.chart, "-f", path, "--quiet"], check=True)
        out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"iris-chart-{f}")
        # Custom resources (the ServiceMonitor) have no schema there: every other
        # manifest is validated, and any failure of the validator fails the check.
        builtin = [d for d in docs if d["apiVersion"] not in CUSTOM_API_VERSIONS]
        with open(out, "w") as fh:
            yaml.safe_dump_all(builtin, fh)
        r = subprocess.run([a.validate, "--strict", "-k", KUBE_VERSION, "--quiet", out],
                           capture_output=True, text=True)
        if r.returncode != 0:
            fail(f"{f}: kubernetes-validate exited {r.returncode}:\n{r.stdout}{r.stderr}")
        check_containers(docs, f)
        check_disruption_budgets(docs, f)
        rendered[f] = docs
        kinds = sorted({d["kind"] for d in docs})
        print(f"chart {f}: {len(docs)} manifests ({', '.join(kinds)}) valid for Kubernetes {KUBE_VERSION}")

    small = rendered["small-cpu.yaml"]
    check_groups(small, 1, 1, 0, "small-cpu")
    check_network(small, "small-cpu", etcd=True)
    etcd = [d for d in small if d["kind"] == "StatefulSet" and component(d) == "etcd"]
    if len(etcd) != 1 or etcd[0]["spec"]["replicas"] != 1:
        fail("small-cpu: one etcd member asked for")

    gpu = rendered["gpu-tp2.yaml"]
    check_groups(gpu, 2, 2, 1, "gpu-tp2")
    check_network(gpu, "gpu-tp2", etcd=False)
    if any(component(d) == "etcd" for d in gpu):
        fail("gpu-tp2: an etcd in the release though an external one is given")
    for d in gpu:
        if component(d) in MEMBERS and pod_spec(d) is not None:
            args = args_of(d)
            if "--otlp-endpoint=http://otel-collector.observability:4318" not in args:
                fail(f"gpu-tp2: {d['metadata']['name']} exports no traces: {args}")
            if "--etcd=https://etcd-0.etcd.infra.svc:2379,https://etcd-1.etcd.infra.svc:2379,https://etcd-2.etcd.infra.svc:2379" not in args \
                    or "--etcd-ca=/etc/iris/etcd-tls/ca.crt" not in args:
                fail(f"gpu-tp2: {d['metadata']['name']} does not reach the external etcd over TLS: {args}")
    enc = next(d for d in gpu if d["kind"] == "Deployment" and component(d) == "encoder")
    if "--device=cuda" not in args_of(enc) or "cuda" not in enc["spec"]["template"]["spec"]["containers"][0]["image"]:
        fail("gpu-tp2: the encoders do not run the CUDA image on a GPU")
    if not any(d["kind"] == "Ingress" for d in gpu) or not any(d["kind"] == "ServiceMonitor" for d in gpu):
        fail("gpu-tp2: no Ingress or ServiceMonitor")

    queue = rendered["encoders-by-queue.yaml"]
    check_groups(queue, 3, 1, 0, "encoders-by-queue")
    hpas = {component(d): d for d in queue if d["kind"] == "HorizontalPodAutoscaler"}
    if set(hpas) != {"gateway", "encoder", "connector"}:
        fail(f"encoders-by-queue: HPAs for {sorted(hpas)}")
    metrics = [m.get("pods", {}).get("metric", {}).get("name") for m in hpas["encoder"]["spec"]["metrics"]]
    if "iris_encoder_queue_depth" not in metrics:
        fail(f"encoders-by-queue: the encoder's HPA reads {metrics}")
    for d in queue:
        if d["kind"] == "Deployment" and component(d) in hpas and "replicas" in d["spec"]:
            fail(f"encoders-by-queue: {d['metadata']['name']} fixes replicas under an HPA")
    models = [a for a in args_of(next(d for d in queue if component(d) == "gateway" and d["kind"] == "Deployment"))
              if a.startswith("--model=")]
    if models != ["--model=/models/llava-1.5-7b", "--model=/models/blip2-flan-t5-xl"]:
        fail(f"encoders-by-queue: models {models}")
    check_images(rendered)
    print("chart check: probes, resources, security contexts, decoder groups, network policies, etcd, HPAs, "
          "entry points: ok")


if __name__ == "__main__":
    main()
