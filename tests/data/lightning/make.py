"""Writes last.ckpt and base.pt: a tiny LightningModule trained two steps by PyTorch Lightning's own Trainer
(its ModelCheckpoint callback writes the .ckpt: state_dict, optimizer_states, loops, callbacks,
hyper_parameters), and the module's weights before training. Run with lightning installed (not a test
dependency; the files are committed):

    python -m venv /tmp/lt && /tmp/lt/bin/pip install torch==2.13.0 lightning
    /tmp/lt/bin/python tests/data/lightning/make.py
"""

from pathlib import Path

import lightning as L
import torch

HERE = Path(__file__).parent


class Tiny(L.LightningModule):
    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    torch.manual_seed(0)
    model = Tiny()
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, HERE / "base.pt")
    data = torch.utils.data.TensorDataset(torch.randn(8, 16), torch.randn(8, 4))
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(HERE / "run"), accelerator="cpu")
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    trainer.save_checkpoint(HERE / "last.ckpt")


if __name__ == "__main__":
    main()
