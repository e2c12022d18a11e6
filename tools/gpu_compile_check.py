"""One fullgraph torch.compile of a mixer block on the Triton path, forward + backward, against the same
block uncompiled on the dense path (a tools/gpu_check.sh step), after the trainer's own CUDA set-up
(mmscale.train.configure_cuda: TF32 on, as in training), in bf16 autocast and in fp32 (where the Triton
path reads the TF32 setting that torch.compile saves and restores around each traced frame).

    python tools/gpu_compile_check.py                          # CUDA, mixer_impl=triton, inductor
    python tools/gpu_compile_check.py --cpu                    # the script's own check here: dense, aot_eager
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mmscale.config import ModelConfig, load_config  # noqa: E402
from mmscale.models.mixer import MixerBlock  # noqa: E402
from mmscale.run.train import configure_cuda  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="dense path, aot_eager backend, on the CPU")
    p.add_argument("--T", type=int, default=1000, help="not a multiple of the kernel's tile on purpose")
    a = p.parse_args()
    dev = "cpu" if a.cpu else "cuda"
    impl, backend = ("dense", "aot_eager") if a.cpu else ("triton", "inductor")
    configure_cuda(load_config(None, ["engine.tf32=true"]))  # what the trainer does before it builds anything
    ok = True
    for amp in (True, False):  # bf16 autocast, then fp32 (TF32 on: loose bounds)
        torch.manual_seed(0)
        torch._dynamo.reset()
        block = MixerBlock(ModelConfig(d_model=128, n_ctx=a.T, n_layers=1, vocab_size=64, mixer_impl=impl)).to(dev)
        ref = MixerBlock(ModelConfig(d_model=128, n_ctx=a.T, n_layers=1, vocab_size=64, mixer_impl="dense")).to(dev)
        ref.load_state_dict(block.state_dict())
        x = torch.randn(4, a.T, 128, device=dev, requires_grad=True)
        block.compile(backend=backend, fullgraph=True)
        outs = []
        for m in (block, ref):
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
                y = m(x)
            y.float().square().mean().backward()
            outs.append((y.float().detach(), x.grad.clone(), m.mixing.weight.grad.clone()))
            x.grad = None
        rel = [((u - v).abs().max() / v.abs().max()).item() for u, v in zip(*outs)]
        mode = "bf16 autocast" if amp else "fp32 (TF32 on)"
        good = rel[0] < 2e-2 and rel[1] < 5e-2 and rel[2] < 5e-2
        ok &= good
        print(f"fullgraph compile ({impl}, {backend}, {mode}) vs eager dense: relative max error forward "
              f"{rel[0]:.2e}, input grad {rel[1]:.2e}, mixing-weight grad {rel[2]:.2e}: {'ok' if good else 'TOO LARGE'}")
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())
