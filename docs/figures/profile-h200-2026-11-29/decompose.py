"""What slows the step that overlaps a checkpoint's D2H phase? Each background load alone."""
import os, statistics, sys, threading, time
import torch
import crc32c
from aiockpt.tools.workloads import preset_workload, sync

preset = sys.argv[1]
dev = torch.device("cuda")
w = preset_workload(preset, dev)
w.warm_up(5)
nbytes = w.state_bytes()
chunk = 256 << 20
n = nbytes // chunk
src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
host = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(n)]
low = torch.cuda.Stream(priority=0)
try:
    low = torch.cuda.Stream(priority=torch.cuda.Stream.priority_range()[0] if False else 0)
except Exception:
    pass

def step_timed():
    c = time.thread_time(); t = time.perf_counter(); w.step(); sync(dev)
    return (time.perf_counter() - t) * 1e3, (time.thread_time() - c) * 1e3

def d2h():
    with torch.cuda.stream(low):
        for i in range(n):
            host[i].copy_(src[i * chunk:(i + 1) * chunk], non_blocking=True)
    low.synchronize()

def crc_threads(k=8):
    def work(i0):
        for i in range(i0, n, k):
            crc32c.crc32c(memoryview(host[i].numpy()))
    ts = [threading.Thread(target=work, args=(i,)) for i in range(k)]
    [t.start() for t in ts]; [t.join() for t in ts]

def write_threads(k=8):
    fd = os.open("/tmp/decomp.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0))
    def work(i0):
        for i in range(i0, n, k):
            mv = memoryview(host[i].numpy())
            for off in range(0, chunk, 16 << 20):
                os.pwrite(fd, mv[off:off + (16 << 20)], i * chunk + off)
    ts = [threading.Thread(target=work, args=(i,)) for i in range(k)]
    [t.start() for t in ts]; [t.join() for t in ts]
    os.fsync(fd); os.close(fd)

def py_spin_thread(seconds=0.08):
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += 1

loads = {"none": None, "d2h": d2h, "crc8": crc_threads, "write8": write_threads, "pyspin80ms": py_spin_thread}
for rnd in range(2):
    for name, load in loads.items():
        base, hit = [], []
        for k in range(6):
            base += [step_timed() for _ in range(3)]
            if load is None:
                hit.append(step_timed()); continue
            th = threading.Thread(target=load); th.start()
            hit.append(step_timed()); th.join()
        bw = statistics.median(b[0] for b in base); bc = statistics.median(b[1] for b in base)
        print(f"{preset} r{rnd} {name:10s} base wall {bw:.1f} cpu {bc:.1f} | with load wall +{statistics.median(h[0] for h in hit) - bw:.1f} cpu +{statistics.median(h[1] for h in hit) - bc:.1f}", flush=True)
