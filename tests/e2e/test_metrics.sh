#!/usr/bin/env bash
# `folioctl metrics` end to end: a coordinator and two worker groups on a tiny random model, some
# requests served, and the Prometheus text parsed with prometheus-client's own parser. Protects: the
# output is valid text format 0.0.4 (every family once, with HELP and TYPE; folio: names; group
# labels); the counters move as requests are served (requests ended by finish reason and status,
# tokens, prefix-cache hits, the histograms' counts: one TTFT, e2e and queue time per request, one
# inter-token latency per token after the first); histograms are cumulative, +Inf equals _count;
# a refusal at the door counts without a group, a deadline as abort; and every figure that
# `folioctl status --json` also reports is the same number there.
set -uo pipefail
build="${FOLIO_BUILD_DIR:?}"
py="${FOLIO_VENV:-}/bin/python"
if [ -z "${FOLIO_VENV:-}" ] || [ ! -x "$py" ]; then
  echo "no test venv at '${FOLIO_VENV:-}' (bash scripts/setup.sh --test-tools makes it)"
  exit 77
fi
"$py" -c "import prometheus_client.parser" || { echo "FAIL prometheus_client missing from $FOLIO_VENV"; exit 1; }
tmp="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
export FOLIO_LOG=warn
ctl="$build/folioctl"
fails=0
check() { # name, command...
  local name="$1"; shift
  if "$@"; then echo "ok   $name"; else echo "FAIL $name"; fails=$((fails + 1)); fi
}

"$build/folio-mkmodel" -o "$tmp/tiny.gguf" --layers 2 --dim 64 --ff 128 --heads 4 --kv-heads 2 --vocab 400 \
  --ctx 4096 --type q8_0 --seed 3 >/dev/null 2>&1 || { echo "FAIL folio-mkmodel"; exit 1; }
ep="ipc://$tmp/c"
"$build/folio-coordinator" --listen "$ep" --workers "ipc://$tmp/w" -m "$tmp/tiny.gguf" --heartbeat-ms 200 &
pids+=($!)
for g in g0 g1; do
  "$build/folio-worker" --workers "ipc://$tmp/w" --group "$g" -m "$tmp/tiny.gguf" --threads 1 --heartbeat-ms 200 &
  pids+=($!)
done
serving=0
for _ in $(seq 1 100); do
  if "$ctl" health --coordinator "$ep" >/dev/null 2>&1 &&
    [ "$("$ctl" status --coordinator "$ep" --json 2>/dev/null | "$py" -c \
      'import json,sys; print(sum(1 for g in json.load(sys.stdin)["groups"] if g["healthy"]))')" = 2 ]; then
    serving=1
    break
  fi
  sleep 0.2
done
[ $serving -eq 1 ] || { echo "FAIL the cluster never served with 2 healthy groups"; exit 1; }

"$ctl" metrics --coordinator "$ep" >"$tmp/m0.txt"
check "folioctl metrics exits 0" test $? -eq 0

# The checks, in Python: parse(file) gives {(sample name, frozenset(labels)): value}.
cat >"$tmp/lib.py" <<'PY'
import json, math, re, sys
from prometheus_client.parser import text_string_to_metric_families

def parse(path):
    text = open(path, encoding="utf-8").read()
    assert text.endswith("\n"), "the text ends with a newline"
    types = {}
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)$", line)
        if m:
            assert m.group(1) not in types, f"family {m.group(1)} has two TYPE lines"
            types[m.group(1)] = m.group(2)
    helps = set(re.findall(r"^# HELP (\S+) ", text, re.M))
    assert helps == set(types), f"HELP and TYPE differ: {helps ^ set(types)}"
    out, fams = {}, {}
    for fam in text_string_to_metric_families(text):
        fams[fam.name] = fam.type
        for s in fam.samples:
            assert s.name.startswith("folio:"), s.name
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate sample {key}"
            out[key] = s.value
    for name, typ in types.items():
        assert name.startswith("folio:"), name
        base = name[:-6] if typ == "counter" and name.endswith("_total") else name
        assert fams.get(base) == typ, f"{name}: parsed as {fams.get(base)}, TYPE {typ}"
    return out, types

def get(m, name, **labels):
    return m.get((name, frozenset(labels.items())), 0.0)

def total(m, name, **labels):
    """Sum over every sample of name whose labels include these."""
    return sum(v for (n, ls), v in m.items() if n == name and set(labels.items()) <= set(ls))

HISTOGRAMS = ["time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
              "request_queue_time_seconds", "request_prompt_tokens", "request_generation_tokens"]

def check_histograms(m):
    """Every histogram series: le increasing, counts cumulative, +Inf equals _count."""
    series = {}
    for (n, ls), v in m.items():
        if n.endswith("_bucket"):
            d = dict(ls)
            le = d.pop("le")
            series.setdefault((n[:-7], frozenset(d.items())), []).append((float(le), v))
    assert series, "no histogram series"
    for (base, ls), buckets in series.items():
        buckets.sort()
        assert buckets[-1][0] == math.inf, (base, ls)
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), f"{base}{dict(ls)} buckets not cumulative: {counts}"
        assert counts[-1] == m[(base + "_count", ls)], (base, ls)
        assert m[(base + "_sum", ls)] >= 0
    return series
PY

check "before any request: valid text, every family there, counters at zero" "$py" - "$tmp" <<'PY'
import sys; sys.path.insert(0, sys.argv[1]); from lib import *
m, types = parse(sys.argv[1] + "/m0.txt")
want = {"folio:num_requests_running": "gauge", "folio:num_requests_waiting": "gauge",
        "folio:kv_cache_usage_perc": "gauge", "folio:prefix_cache_queries_total": "counter",
        "folio:prefix_cache_hits_total": "counter", "folio:num_preemptions_total": "counter",
        "folio:prompt_tokens_total": "counter", "folio:generation_tokens_total": "counter",
        "folio:request_success_total": "counter", "folio:spec_decode_num_draft_tokens_total": "counter",
        "folio:spec_decode_num_accepted_tokens_total": "counter"}
want.update({"folio:" + h: "histogram" for h in HISTOGRAMS})
for name, typ in want.items():
    assert types.get(name) == typ, (name, types.get(name))
for g in ("g0", "g1"):
    assert ("folio:num_requests_running", frozenset({("group", g)})) in m, g
    for r in ("stop", "length", "abort", "error"):
        assert get(m, "folio:request_success_total", group=g, finished_reason=r) == 0
    assert get(m, "folio:time_to_first_token_seconds_count", group=g) == 0
check_histograms(m)
PY

# Served: four short prompts and a long one twice (its second run hits the prefix cache), 8 tokens
# each; and one prompt longer than any context, refused at the door.
long="$(printf 'the quick brown fox jumps over the lazy dog %.0s' $(seq 1 12))"
for p in "one" "two two" "three three three" "four" "$long" "$long"; do
  "$ctl" generate --coordinator "$ep" -p "$p" -n 8 --ignore-eos --json 2>/dev/null | tail -n 1 >>"$tmp/gen.jsonl"
done
"$ctl" generate --coordinator "$ep" -p "$(printf 'hello world %.0s' $(seq 1 1000))" -n 8 --json \
  >"$tmp/refused.json" 2>/dev/null
check "six requests served" test "$(wc -l <"$tmp/gen.jsonl")" -eq 6
check "the long prompt is refused RESOURCE_EXHAUSTED" grep -q RESOURCE_EXHAUSTED "$tmp/refused.json"

# The workers' totals come with their heartbeats (every 200 ms): wait until they count every token.
for _ in $(seq 1 50); do
  "$ctl" metrics --coordinator "$ep" >"$tmp/m1.txt" 2>/dev/null
  "$py" - "$tmp" 2>/dev/null <<'PY' && break
import sys; sys.path.insert(0, sys.argv[1]); from lib import *
m, _ = parse(sys.argv[1] + "/m1.txt")
assert total(m, "folio:generation_tokens_total") >= 48 and total(m, "folio:num_requests_running") == 0
PY
  sleep 0.2
done
"$ctl" status --coordinator "$ep" --json >"$tmp/s1.json" 2>/dev/null
"$ctl" metrics --coordinator "$ep" >"$tmp/m1.txt" 2>/dev/null

check "the counters moved as the requests were served" "$py" - "$tmp" <<'PY'
import sys; sys.path.insert(0, sys.argv[1]); from lib import *
d = sys.argv[1]
m, _ = parse(d + "/m1.txt")
gens = [json.loads(l) for l in open(d + "/gen.jsonl")]
assert all(g["finish_reason"] == "length" and len(g["tokens"]) == 8 for g in gens), gens
prompt = sum(g["usage"]["prompt_tokens"] for g in gens)
cached = sum(g["usage"]["cached_prompt_tokens"] for g in gens)
assert total(m, "folio:request_success_total", finished_reason="length") == 6
assert total(m, "folio:request_success_total") == 7
assert total(m, "folio:request_status_total", code="OK") == 6
# the refusal: no group served it, so no group label
assert get(m, "folio:request_success_total", finished_reason="error") == 1
assert get(m, "folio:request_status_total", code="RESOURCE_EXHAUSTED") == 1
assert get(m, "folio:coordinator_requests_admitted_total") == 6
for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
          "request_prompt_tokens", "request_generation_tokens"):
    assert total(m, f"folio:{h}_count") == 6, (h, total(m, f"folio:{h}_count"))
assert total(m, "folio:inter_token_latency_seconds_count") == 6 * 7
assert total(m, "folio:request_generation_tokens_sum") == 48
assert total(m, "folio:request_prompt_tokens_sum") == prompt
# the workers' totals (heartbeats) agree with what the clients were told
assert total(m, "folio:generation_tokens_total") == 48
assert total(m, "folio:prompt_tokens_total") == prompt
assert total(m, "folio:prefix_cache_queries_total") == prompt
assert total(m, "folio:prefix_cache_hits_total") == cached > 0, cached
ttft = total(m, "folio:time_to_first_token_seconds_sum")
assert 0 < ttft < 6 * 30
assert total(m, "folio:e2e_request_latency_seconds_sum") >= ttft
series = check_histograms(m)
assert {dict(ls).get("group") for (b, ls) in series} >= {"g0", "g1"}
PY

check "the same figures as folioctl status --json" "$py" - "$tmp" <<'PY'
import sys; sys.path.insert(0, sys.argv[1]); from lib import *
d = sys.argv[1]
m, _ = parse(d + "/m1.txt")
s = json.load(open(d + "/s1.json"))
assert get(m, "folio:coordinator_requests_admitted_total") == s["requests_total"]
assert get(m, "folio:coordinator_requests_inflight") == s["requests_inflight"]
assert get(m, "folio:coordinator_requests_failed_over_total") == s["requests_failed_over"]
assert get(m, "folio:coordinator_requests_migrated_total") == s.get("requests_migrated", 0)
REASON = {"FINISH_STOP": "stop", "FINISH_LENGTH": "length", "FINISH_CANCELLED": "abort", "FINISH_ERROR": "error"}
HIST = {"time_to_first_token": "time_to_first_token_seconds", "inter_token_latency": "inter_token_latency_seconds",
        "e2e_request_latency": "e2e_request_latency_seconds", "request_queue_time": "request_queue_time_seconds",
        "request_prompt_tokens": "request_prompt_tokens", "request_generation_tokens": "request_generation_tokens"}
def same_requests(r, labels):
    for reason in REASON.values():
        n = sum(f["count"] for f in r["finished"] if REASON[f["finish_reason"]] == reason)
        assert get(m, "folio:request_success_total", finished_reason=reason, **labels) == n, (labels, reason)
    for f in r["finished"]:
        assert get(m, "folio:request_status_total", code=f["code"], **labels) >= f["count"]
    for field, name in HIST.items():
        h = r[field]
        buckets = {float(dict(ls)["le"]): v for (n, ls), v in m.items()
                   if n == f"folio:{name}_bucket" and {k: v for k, v in ls if k != "le"} == labels}
        if not labels and not h["count"]:  # requests no group served: only what they have
            assert not buckets, (field, buckets)
            continue
        assert get(m, f"folio:{name}_count", **labels) == h["count"], (labels, field)
        assert math.isclose(get(m, f"folio:{name}_sum", **labels), h["sum"], rel_tol=1e-9, abs_tol=1e-12)
        assert buckets == {**dict(zip(h["bounds"], h["cumulative"])), math.inf: h["count"]}, (labels, field)
LOAD = {"num_requests_running": "running", "num_requests_waiting": "waiting",
        "prefix_cache_queries_total": "prompt_tokens", "prefix_cache_hits_total": "cached_prompt_tokens",
        "prompt_tokens_total": "prompt_tokens", "generation_tokens_total": "generated_tokens",
        "num_preemptions_total": "preemptions", "spec_decode_num_drafts_total": "spec_seq_steps",
        "spec_decode_num_draft_tokens_total": "drafted_tokens",
        "spec_decode_num_accepted_tokens_total": "accepted_tokens"}
assert len(s["groups"]) == 2
for g in s["groups"]:
    lb = {"group": g["name"]}
    l = g["load"]
    for name, field in LOAD.items():
        assert get(m, "folio:" + name, **lb) == l[field], (g["name"], name, l[field])
    assert get(m, "folio:kv_cache_blocks", state="used", **lb) == l["kv_blocks_used"]
    assert get(m, "folio:kv_cache_blocks", state="cached", **lb) == l["kv_blocks_cached"]
    assert total(m, "folio:kv_cache_blocks", **lb) == l["kv_blocks_total"]
    assert math.isclose(get(m, "folio:kv_cache_usage_perc", **lb), l["kv_blocks_used"] / l["kv_blocks_total"])
    assert get(m, "folio:group_healthy", **lb) == (1 if g["healthy"] else 0)
    assert get(m, "folio:num_requests_inflight", **lb) == g["inflight"]
    assert get(m, "folio:group_restarts_total", **lb) == g["restarts"]
    assert get(m, "folio:group_info", model=g["model_id"], tp_size=str(g["tp_size"]), **lb) == 1
    same_requests(g["requests"], lb)
same_requests(s["requests_no_group"], {})
PY

# A deadline: the request ends DEADLINE_EXCEEDED, which vLLM's label calls abort.
"$ctl" generate --coordinator "$ep" -p "slow" -n 3000 --ignore-eos --timeout-ms 100 --json >"$tmp/late.json" 2>/dev/null
check "the 100 ms request ends DEADLINE_EXCEEDED" grep -q DEADLINE_EXCEEDED "$tmp/late.json"
"$ctl" metrics --coordinator "$ep" >"$tmp/m2.txt" 2>/dev/null
check "a deadline counts as abort, by its status code too" "$py" - "$tmp" <<'PY'
import sys; sys.path.insert(0, sys.argv[1]); from lib import *
m, _ = parse(sys.argv[1] + "/m2.txt")
assert total(m, "folio:request_success_total", finished_reason="abort") == 1
assert total(m, "folio:request_status_total", code="DEADLINE_EXCEEDED") == 1
assert total(m, "folio:request_success_total", finished_reason="length") == 6
assert total(m, "folio:e2e_request_latency_seconds_count") == 7
check_histograms(m)
PY

[ $fails -eq 0 ] || { echo "$fails check(s) failed"; exit 1; }
echo "all metrics checks passed"
