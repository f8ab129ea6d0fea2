#!/usr/bin/env bash
# Roll out an overlay with plain kubectl, in the order mlpipe needs:
#   1. everything but the workers (namespace, config, service account, KEDA objects, PDBs,
#      RabbitMQ cluster and the migration Job);
#   2. wait for `mlpipe migrate` to complete (workers refuse an unmigrated schema);
#   3. the workers.
# Argo CD does the same through the sync waves and the Job's hook annotations; Flux users put
# the Job in a Kustomization of its own that the workers' one dependsOn.
#
#   deploy/k8s/apply.sh dev|prod        (KUBECTL=... to use another binary)
set -euo pipefail

overlay="${1:?usage: $0 dev|prod}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
kubectl="${KUBECTL:-kubectl}"
rendered="$(mktemp)"
trap 'rm -f "$rendered"' EXIT

"$kubectl" kustomize "$here/overlays/$overlay" >"$rendered"
ns="$(sed -n 's/^  namespace: //p' "$rendered" | head -n 1)"

# A Job's pod template cannot change in place: a new image needs a new Job.
"$kubectl" -n "$ns" delete job mlpipe-migrate --ignore-not-found --wait=true
"$kubectl" apply -f "$rendered" --selector 'app.kubernetes.io/component!=worker'
if ! "$kubectl" -n "$ns" wait --for=condition=complete job/mlpipe-migrate --timeout=15m; then
  "$kubectl" -n "$ns" logs job/mlpipe-migrate --tail=50 || true
  echo "mlpipe migrate did not complete; workers not rolled out" >&2
  exit 1
fi
"$kubectl" apply -f "$rendered"
"$kubectl" -n "$ns" rollout status deployment --selector app.kubernetes.io/component=worker \
  --timeout=30m
