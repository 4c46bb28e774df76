"""Restore from the memory tier after a crash: time for 4.25 GB (350m preset) on the GPU."""
import json, os, shutil, sys, time
import torch
import aiockpt
from aiockpt.tools.workloads import preset_workload, sync

phase, out = sys.argv[1], os.environ.get("OUT", "/tmp")
dev = torch.device("cuda")
w = preset_workload("350m", dev)
cfg = aiockpt.Config(directory="/tmp/tier-primary", memory={"keep_last": 1}, interval_steps=1000)
if phase == "save":
    shutil.rmtree("/tmp/tier-primary", ignore_errors=True)
    w.warm_up(3)
    ck = aiockpt.SyncCheckpointer(cfg, **w.state())
    t = time.perf_counter(); ck.checkpoint(7).wait(); dt = time.perf_counter() - t
    print("memory-tier checkpoint durable in", round(dt, 3), "s;", ck.stats.tiers["memory"].location, flush=True)
    os._exit(0)  # a crash: no close(), the memory tier stays
else:
    ck = aiockpt.SyncCheckpointer(cfg, **w.state())
    sync(dev)
    t = time.perf_counter(); step = ck.restore(); sync(dev); dt = time.perf_counter() - t
    nbytes = w.state_bytes()
    res = {"step": step, "tier": ck.stats.last_restore_tier, "seconds": dt, "bytes": nbytes, "bytes_read": ck.stats.last_restore_bytes}
    print(json.dumps(res), flush=True)
    json.dump(res, open(f"{out}/tier-restore.json", "w"))
    ck.close()
