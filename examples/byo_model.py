"""Bring your own model: your CNN (with BatchNorm), your data, your training loop; three label-skewed clients
each train from their own initialisation and the server merges them with CCA Merge in one Flower round."""
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from flwr.app import ArrayRecord
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from fedmerge.client import make_client_app
from fedmerge.common.task.data import (  # any labelled images will do
    load_dataset,
    to_tensor,
)
from fedmerge.server import CCAMerge

data = load_dataset("cifar10-mini", "train")               # 8,000 real CIFAR-10 images, embedded
X, Y = to_tensor(data.x, data.name), torch.from_numpy(data.y)
PROBE = X[:400]                                             # shared, unlabelled; no client trains on it
SKEW = [Y < 7, Y >= 3, (Y < 3) | (Y >= 6)]                  # three label-skewed clients, 7 classes each


class MyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 8 * 8, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        return self.fc(torch.flatten(F.max_pool2d(F.relu(self.b2(self.c2(x))), 2), 1))


def my_train(model, context, config, steps=150):
    pid = int(config["partition-id"])
    torch.manual_seed(pid)
    idx = torch.nonzero(SKEW[pid][400:]).flatten() + 400
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        b = idx[torch.randint(len(idx), (64,))]
        opt.zero_grad()
        F.cross_entropy(model(X[b]), Y[b]).backward()
        opt.step()
    return len(idx), {}


server = ServerApp()


@server.main()
def main(grid, context):
    torch.manual_seed(100)
    strategy = CCAMerge(model_fn=MyNet, probe=PROBE, method="cca", num_clients=3, min_clients=2,
                        max_examples=8000, on_failed_round="raise")
    result = strategy.start(grid, ArrayRecord(), num_rounds=1)
    if len(sys.argv) > 1:                                           # optional: where to save the merged model
        torch.save(result.arrays.to_torch_state_dict(), sys.argv[1])
    test = load_dataset("cifar10-mini", "test")
    xt, yt = to_tensor(test.x, test.name), torch.from_numpy(test.y)
    for r in strategy.history[-1].clients_rejected:   # a client dropped by a check says why
        print(f"rejected: client {r.get('partition')} ({r.get('phase')}): {r.get('reason')}")
    for name, state in [("merged", result.arrays.to_torch_state_dict()), *strategy.last_states.items()]:
        model = MyNet()
        model.load_state_dict(state)
        with torch.no_grad():
            print(f"{name}: test accuracy {(model.eval()(xt).argmax(1) == yt).float().mean():.3f}")


client = make_client_app(model_fn=MyNet, train_fn=my_train, probe_fn=lambda context: PROBE)

if __name__ == "__main__":
    run_simulation(server, client, num_supernodes=3)
