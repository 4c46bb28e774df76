"""PyTorch Lightning: ``AiockptCheckpointIO``, a ``CheckpointIO`` plugin on aiockpt's path-level
saves.

``Trainer(plugins=[AiockptCheckpointIO()])`` leaves ``ModelCheckpoint`` and everything
else as it is: Lightning still decides when to save, names the paths and deletes what
``save_top_k`` drops. What changes is how a checkpoint is written: ``save_checkpoint``
returns once the checkpoint dict is captured (its tensors copied into staging memory
that is reused from save to save), and the bytes reach the disk in the background, as an
aiockpt checkpoint directory at the path Lightning gave (manifest, checksums, atomic
replace). Loading and removing a path first wait for the saves of that path in flight;
``teardown`` (the end of ``fit``) waits for all of them, raises a failure, and frees the
staging memory until the next save.

Needs ``pip install 'aiockpt[lightning]'``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

import aiockpt

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "aiockpt.integrations.lightning needs PyTorch Lightning: pip install 'aiockpt[lightning]'"
    ) from exc

__all__ = ["AiockptCheckpointIO"]


def _device(map_location: Any) -> str | torch.device:
    """Where loaded tensors go: a device Lightning names, else the CPU (which is where
    Lightning's own default, ``lambda storage, loc: storage``, leaves a CPU checkpoint)."""
    if isinstance(map_location, (str, torch.device)):
        return map_location
    return "cpu"


class AiockptCheckpointIO(CheckpointIO):  # type: ignore[misc]
    """Lightning's checkpoint writes and reads through aiockpt: asynchronous, checksummed,
    atomic.

    >>> checkpoints = ModelCheckpoint(every_n_train_steps=500, save_top_k=3, save_last=True)
    >>> trainer = lightning.Trainer(plugins=[AiockptCheckpointIO()], callbacks=[checkpoints])

    Each checkpoint is a directory at the path Lightning names (``epoch=3-step=400.ckpt``),
    readable with ``aiockpt.load(path)``, ``aiockpt inspect`` and ``aiockpt verify``.

    Args:
        config: the settings of the saves (an :class:`aiockpt.Config`, the path of a TOML
            file, or None for the defaults): ``chunk_size_mb``, ``num_threads``,
            ``max_async``, ``pinned_ratio``, ``staging``, ``durable``, ...

    Raises:
        ConfigError: ``config`` is not a Config or a TOML path, or the file is bad.
    """

    def __init__(self, config: aiockpt.Config | str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        if config is None:
            config = aiockpt.Config()
        elif isinstance(config, (str, os.PathLike)):
            config = aiockpt.Config.from_toml(config)
        elif not isinstance(config, aiockpt.Config):
            raise aiockpt.ConfigError(
                f"AiockptCheckpointIO(config={type(config).__name__}) has the wrong type: "
                "expected an aiockpt.Config, the path of a TOML file or None"
            )
        self.config = config
        self._saver: aiockpt.PathSaver | None = None

    def _owner(self) -> aiockpt.PathSaver:
        # Made on the first save and again after teardown(): fit, then test, then fit.
        if self._saver is None or self._saver.closed:
            self._saver = aiockpt.PathSaver(self.config)
        return self._saver

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any = None
    ) -> None:
        """Capture ``checkpoint`` now and write it to ``path`` in the background.

        Returns once every tensor is copied: training may change them right after.

        Args:
            checkpoint: the dict Lightning builds (weights, optimizer and scheduler states,
                loops, callbacks, hyper-parameters, versions).
            path: where Lightning wants it; a checkpoint there is replaced atomically.
            storage_options: not supported; must be None.

        Raises:
            UsageError: ``storage_options`` was given.
            UnsupportedStateError: the checkpoint holds a value aiockpt cannot store (a
                hyper-parameter of an arbitrary class, say); its key path is named and
                nothing is written.
            ConfigError: ``path`` holds something other than an aiockpt checkpoint (a
                ``torch.save`` file, say); nothing is touched.
            BackgroundError: an earlier save failed in the background.
        """
        if storage_options is not None:
            raise aiockpt.UsageError(
                f"storage_options={storage_options!r}: AiockptCheckpointIO takes its settings "
                "from the aiockpt.Config given to it, not per save; pass storage_options=None"
            )
        step = checkpoint.get("global_step")
        self._owner().save(checkpoint, path, step=step if isinstance(step, int) else None)

    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        map_location: Any = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """The checkpoint dict saved at ``path``, after the saves of it in flight.

        Args:
            path: a checkpoint this plugin saved.
            map_location: a device (``str`` or ``torch.device``) for the tensors; anything
                else (None, a function, a dict) loads them on the CPU.
            weights_only: accepted for Lightning's signature; an aiockpt checkpoint never
                runs code when loaded, so every load is as safe as ``weights_only=True``.

        Returns:
            The dict Lightning saved, with every value of its original type.

        Raises:
            BackgroundError: the newest save to ``path`` failed.
            NoCheckpointError: nothing is at ``path``.
            CorruptCheckpointError: it is not a valid aiockpt checkpoint (torn, changed,
                or a ``torch.save`` file).
        """
        del weights_only
        if self._saver is not None and not self._saver.closed:
            # ``save_last="link"`` makes last.ckpt a link: wait for what it points at.
            self._saver.wait(os.path.realpath(path))
        return aiockpt.load(Path(path), map_location=_device(map_location))

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Delete the checkpoint at ``path`` (``save_top_k`` dropping one), once the saves
        of it in flight are over; a link (``save_last="link"``) is unlinked.

        Args:
            path: a checkpoint this plugin saved.

        Raises:
            ConfigError: ``path`` holds something other than an aiockpt checkpoint.
            BackgroundError: the newest save to ``path`` failed.
        """
        if os.path.islink(path):  # ``save_last="link"``: the link goes, not its target
            os.unlink(path)
            return
        self._owner().remove(path)

    def teardown(self) -> None:
        """Wait for every save in flight and free the staging memory (until the next save).

        Raises:
            BackgroundError: a save failed in the background; ``__cause__`` holds the
                original exception.
        """
        saver, self._saver = self._saver, None
        if saver is not None:
            saver.close()
