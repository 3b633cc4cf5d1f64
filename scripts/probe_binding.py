import subprocess, sys
CASES = ["qfloat", "bt_long", "h3", "dv256", "meta_long", "ok"]
if len(sys.argv) == 1:
    for c in CASES:
        r = subprocess.run([sys.executable, __file__, c], capture_output=True, text=True)
        print(c, "rc", r.returncode, (r.stdout + r.stderr).strip().splitlines()[-1:] )
    sys.exit()
import torch, kvpager.kernels as K
torch.manual_seed(0)
b = 2
q = torch.randn(b, 1, 16, 576, device="cuda", dtype=torch.bfloat16)
k = torch.randn(4, 64, 1, 576, device="cuda", dtype=torch.bfloat16)
bt = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device="cuda")
sl = torch.tensor([70, 5], dtype=torch.int32, device="cuda")
meta, ns = torch.ops.kvpager.get_mla_metadata(sl, 16, 1)
c = sys.argv[1]
args = dict(qfloat=(q.float(), k, bt, sl, 512, meta, ns), bt_long=(q, k, bt.long(), sl, 512, meta, ns),
            h3=(q[:, :, :3].contiguous(), torch.cat([k, k], 2), bt, sl, 512, meta, ns), dv256=(q, k, bt, sl, 256, meta, ns),
            ok=(q, k, bt, sl, 512, meta, ns))
try:
    if c == "meta_long":
        torch.ops.kvpager.get_mla_metadata(sl.long(), 16, 1)
    else:
        torch.ops.kvpager.mla_decode(*args[c], 576 ** -0.5, False)
    torch.cuda.synchronize(); print("no error")
except RuntimeError as e:
    print("RuntimeError:", str(e).splitlines()[0][:150])
