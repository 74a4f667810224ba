"""The data buffer (central warehouse): prompt datasets in, groups of samples out, all persisted."""

from rlfoundry.buffer.buffer import Buffer, PromptDataset, PromptRecord

__all__ = ["Buffer", "PromptDataset", "PromptRecord"]
