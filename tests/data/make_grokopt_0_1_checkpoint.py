"""Write a grokopt 0.1 checkpoint (run with grokopt 0.1 on the path) and the parameters
that 0.1 reaches by continuing from it, for tests/test_wrapper.py's compatibility test."""
import sys, torch
sys.path.insert(0, sys.argv[2])  # that version's tests/, for contract.py
from contract import make_batches, make_model
import grokopt

def build(model):
    inner = grokopt.Grokfast(torch.optim.AdamW(model.parameters(), lr=1e-2), alpha=0.9)
    return grokopt.AmplifiedOptimizer(inner, hidden=(4,), meta_every=2, g_hat="last")

def run(model, opt, batches):
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.maybe_meta_step(model, lambda fwd, x=x, y=y: torch.nn.functional.mse_loss(fwd(x), y))

torch.manual_seed(0)
batches = make_batches(8)
model = make_model(0)
opt = build(model)
run(model, opt, batches[:4])
import copy
saved = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})  # not views of live state
run(model, opt, batches[4:])
saved["continued"] = [p.detach().clone() for p in model.parameters()]
saved["grokopt_version"] = grokopt.__version__
torch.save(saved, sys.argv[1])
print("wrote", sys.argv[1], grokopt.__version__, sorted(saved["optimizer"]))
