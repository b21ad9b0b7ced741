"""One training iteration of `engine.train_one_epoch` under torchrun, on a fixed split of the golden batch.

    torchrun --standalone --nproc_per_node=2 tests/dist_loss_worker.py OUT.pth   # 1 image per process
    torchrun --standalone --nproc_per_node=1 tests/dist_loss_worker.py OUT.pth   # both images, one process

Launched by tests/test_launch.py. The inputs bypass the data loader so that both runs see the same
images with the same padding; dropout is 0 and split_class off, so nothing random remains and the
logged loss and the updated weights must agree between the world sizes (the distributed loss
normalisation: num_boxes averaged over ranks, DDP's gradient averaging, the reduced loss dict).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from engine import train_one_epoch  # noqa: E402
from models import build_model  # noqa: E402
from tests import golden  # noqa: E402
from tests.helpers import golden_train_targets  # noqa: E402
from util import dist  # noqa: E402
from util.nested_tensor import NestedTensor  # noqa: E402
from util.optim import build_optimizer  # noqa: E402


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    args = golden.model_args(dropout=0.0, device="cpu")
    dist.init_distributed_mode(args)
    model, criterion, _ = build_model(args)
    model.load_state_dict(golden.load("checkpoint_tiny.pth")["model"], strict=True)
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer, _ = build_optimizer(model_without_ddp, lr=args.lr, weight_decay=args.weight_decay,
                                   lr_drop=args.lr_drop)
    inputs = golden.load("inputs.pth")
    targets = golden_train_targets("inputs.pth")
    images = len(targets)
    per_rank = images // args.world_size
    mine = slice(args.rank * per_rank, (args.rank + 1) * per_rank)
    batch = [(NestedTensor(inputs["batch"][mine], inputs["mask"][mine]), targets[mine])]
    stats = train_one_epoch(model, criterion, batch, optimizer, torch.device("cpu"), 0,
                            categories=inputs["train_categories"], max_norm=args.clip_max_norm)
    if dist.is_main_process():
        weights = {k: v for k, v in model_without_ddp.state_dict().items()}
        torch.save({"stats": stats, "weights": weights, "world_size": args.world_size}, out_path)


if __name__ == "__main__":
    main(sys.argv[1])
