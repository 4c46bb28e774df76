"""Where a checkpoint's cost goes on the GPU: stall parts, next-step cost, a profiler trace."""
import gc, json, os, statistics, sys, time, gzip, shutil
import torch
import aiockpt
from aiockpt.tools.workloads import preset_workload, sync

out = os.environ.get("OUT", "/tmp/out")
preset = sys.argv[1] if len(sys.argv) > 1 else "350m"
dev = torch.device("cuda")
w = preset_workload(preset, dev)
w.warm_up(5)
res = {"preset": preset, "state_bytes": w.state_bytes()}

def timed_steps(n):
    ts = []
    for _ in range(n):
        t = time.perf_counter(); w.step(); sync(dev); ts.append((time.perf_counter() - t) * 1e3)
    return ts

res["none_ms"] = timed_steps(30)
# D2D copy of the whole state alone, timed on the current stream
sd = w.model.state_dict(); osd = w.optimizer.state_dict()
flat = [v for v in sd.values() if torch.is_tensor(v)] + [v for s in osd["state"].values() for v in s.values() if torch.is_tensor(v) and v.is_cuda]
nbytes = sum(t.numel() * t.element_size() for t in flat)
buf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
def d2d():
    off = 0
    for t in flat:
        n = t.numel() * t.element_size()
        buf[off:off + n].copy_(t.contiguous().view(-1).view(torch.uint8)); off += n
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
d2d_ms = []
for _ in range(5):
    s.record(); d2d(); e.record(); e.synchronize(); d2d_ms.append(s.elapsed_time(e))
res["d2d_naive_ms"] = d2d_ms
del buf; torch.cuda.empty_cache()

cfg = aiockpt.Config(directory="/tmp/prof-ck", keep_last=2, max_async=2)
shutil.rmtree("/tmp/prof-ck", ignore_errors=True)
rows = []
with aiockpt.SyncCheckpointer(cfg, **w.state()) as ck:
    t = time.perf_counter(); h = ck.checkpoint(0); res["first_call_ms"] = (time.perf_counter() - t) * 1e3
    h.wait()
    # flatten cost alone (the state_dict walk + flatten), on the training thread
    saver = ck._core.saver
    fl = []
    for _ in range(20):
        t = time.perf_counter(); saver.flatten(); fl.append((time.perf_counter() - t) * 1e3)
    res["flatten_ms"] = fl
    gc_mode = [False, True]
    step = 0
    for rnd in range(2):
        for gc_off in gc_mode:
            for k in range(3):
                pre = timed_steps(8)
                if gc_off: gc.disable()
                sync(dev)
                t = time.perf_counter(); step += 1; h = ck.checkpoint(step); stall = (time.perf_counter() - t) * 1e3
                post = timed_steps(6)
                if gc_off: gc.enable()
                h.wait()
                rows.append({"gc_off": gc_off, "stall_ms": stall, "pre_med": statistics.median(pre), "post": post, "metrics": {k2: getattr(h.metrics, k2) for k2 in ("capture_ms", "state_dict_ms", "staging_ms", "persist_seconds", "commit_ms", "copy_seconds", "write_seconds")}})
    res["rows"] = rows
    # profiler around one checkpoint
    from torch.profiler import profile, ProfilerActivity
    timed_steps(5)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=False, with_stack=False) as prof:
        timed_steps(3)
        step += 1
        with torch.profiler.record_function("aiockpt.checkpoint"):
            h = ck.checkpoint(step)
        for i in range(6):
            with torch.profiler.record_function(f"train_step_after_{i}"):
                w.step(); sync(dev)
        h.wait()
    trace = f"{out}/trace-{preset}.json"
    prof.export_chrome_trace(trace)
    with open(trace, "rb") as f, gzip.open(trace + ".gz", "wb") as g: shutil.copyfileobj(f, g)
    os.remove(trace)
    with open(f"{out}/prof-{preset}.txt", "w") as f:
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
        f.write("\n\n")
        f.write(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))
json.dump(res, open(f"{out}/prof-{preset}.json", "w"), indent=1)
none = statistics.median(res["none_ms"])
print(preset, "none med", round(none, 2), "d2d", [round(x, 2) for x in d2d_ms], "first", round(res["first_call_ms"]), "flatten med", round(statistics.median(fl), 2))
for gc_off in gc_mode:
    rs = [r for r in rows if r["gc_off"] == gc_off]
    print("gc_off", gc_off, "stall", [round(r["stall_ms"], 2) for r in rs], "next-step extra", [round(r["post"][0] - none, 1) for r in rs], "2nd", [round(r["post"][1] - none, 1) for r in rs])
