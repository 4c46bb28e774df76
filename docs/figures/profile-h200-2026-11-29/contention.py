"""Next-step cost after a checkpoint: wall vs the training thread's CPU time, per variant."""
import json, os, statistics, sys, time, shutil
import torch
import aiockpt
from aiockpt.tools.workloads import preset_workload, sync

out = os.environ.get("OUT", "/tmp/out")
preset = sys.argv[1]
variants = sys.argv[2].split(",")
dev = torch.device("cuda")
w = preset_workload(preset, dev)
w.warm_up(5)

def step_timed():
    c = time.thread_time(); t = time.perf_counter(); w.step(); sync(dev)
    return (time.perf_counter() - t) * 1e3, (time.thread_time() - c) * 1e3

res = {}
for v in variants:
    kw = dict(directory="/tmp/cont-ck", keep_last=2, max_async=2)
    if v == "nodurable": kw["durable"] = False
    if v == "threads2": kw["num_threads"] = 2
    if v.startswith("switch"):
        sys.setswitchinterval(float(v[6:]))
    shutil.rmtree("/tmp/cont-ck", ignore_errors=True)
    rows = []
    with aiockpt.SyncCheckpointer(aiockpt.Config(**kw), **w.state()) as ck:
        ck.checkpoint(0).wait()
        for k in range(8):
            pre = [step_timed() for _ in range(6)]
            t = time.perf_counter(); h = ck.checkpoint(k + 1); stall = (time.perf_counter() - t) * 1e3
            post = [step_timed() for _ in range(4)]
            h.wait()
            rows.append({"stall": stall, "pre": pre, "post": post, "persist_s": h.metrics.persist_seconds, "copy_s": h.metrics.copy_seconds})
    sys.setswitchinterval(0.005)
    res[v] = rows
    base_w = statistics.median([p[0] for r in rows for p in r["pre"]])
    base_c = statistics.median([p[1] for r in rows for p in r["pre"]])
    print(f"{preset} {v}: pre wall {base_w:.1f} cpu {base_c:.1f} | stall med {statistics.median(r['stall'] for r in rows):.2f} | "
          f"next wall +{statistics.median(r['post'][0][0] for r in rows) - base_w:.1f} cpu +{statistics.median(r['post'][0][1] for r in rows) - base_c:.1f} | "
          f"2nd wall +{statistics.median(r['post'][1][0] for r in rows) - base_w:.1f} | persist {statistics.median(r['persist_s'] for r in rows):.2f}s copy {statistics.median(r['copy_s'] for r in rows):.3f}s", flush=True)
json.dump(res, open(f"{out}/contention-{preset}.json", "w"))
