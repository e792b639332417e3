"""What every preference encoder shares: input checks, batching, its own config file, a fingerprint."""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from .preference_pairs import PreferencePair, as_user_pairs

__all__ = ["CONFIG_NAME", "BasePreferenceEncoder", "resolve_model_source"]

logger = logging.getLogger(__name__)

CONFIG_NAME = "preference_encoder_config.json"
MODEL_FOLDER = "model"  # where `save_pretrained` copies a local model
_ENCODER_CLASSES: dict[str, type[BasePreferenceEncoder]] = {}
# where the library's encoders live: a fresh process has imported none of them when it loads a saved one
_ENCODER_MODULES = {
    "PreferenceEncoder": "ppd_diffusers.preference_encoder",
    "CLIPPreferenceEncoder": "ppd_diffusers.clip_preference_encoder",
}


class BasePreferenceEncoder(nn.Module):
    """Turns each user's preference pairs into a user embedding of shape ``(tokens, width)``.

    Subclasses wrap a pretrained transformers model with its tokenizer and image processor;
    ``from_pretrained`` takes either that model's id/path (with the encoder's options as keyword
    arguments) or a folder written by ``save_pretrained``, whose ``preference_encoder_config.json`` names
    the encoder class and every option, so that a saved encoder reproduces the same embeddings.

    Args:
        model: The wrapped model (frozen, in eval mode).
        tokenizer: Its tokenizer.
        image_processor: Its image processor.
        config: The encoder's options, as saved by ``save_pretrained``.
    """

    config_keys: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _ENCODER_CLASSES[cls.__name__] = cls

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, config: dict[str, Any]):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = dict(config)

    # ----------------------------------------------------------------------------------------------------
    # what subclasses provide

    @property
    def embed_dim(self) -> int:
        """Width of the user embedding (the ``user_embed_dim`` of a matching ``UserAdapter``)."""
        raise NotImplementedError

    @property
    def num_tokens(self) -> int:
        """Tokens per user embedding."""
        raise NotImplementedError

    @property
    def max_image_side(self) -> int | None:
        """Images larger than this are shrunk while they are decoded: 4x the side the vision tower sees,
        so ordinary images (up to that size) reach the image processor untouched, and an 8000 px photo
        does not cost gigabytes. ``None`` (no vision tower size known) keeps every size."""
        vision = getattr(getattr(self.model, "config", None), "vision_config", None)
        size = getattr(vision, "image_size", None)
        return 4 * size if isinstance(size, int) else None

    def _encode_batch(self, users: list[list[PreferencePair]]) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def _from_model(cls, model_name_or_path: str, **kwargs: Any) -> BasePreferenceEncoder:
        raise NotImplementedError

    def _runtime_identity(self) -> dict[str, Any]:
        """What besides the config changes the numbers (dtype, attention kernel, image preprocessing)."""
        return {
            "dtype": str(self.model.dtype),
            "attn_implementation": getattr(self.model.config, "_attn_implementation", None),
            "image_processor": type(self.image_processor).__name__,
            "image_processor_config": self.image_processor.to_dict(),
            "tokenizer_vocab": hashlib.sha256(
                json.dumps(sorted(self.tokenizer.get_vocab().items())).encode()
            ).hexdigest(),
        }

    # ----------------------------------------------------------------------------------------------------

    @property
    def num_pairs(self) -> int:
        """How many preference pairs describe one user."""
        return self.config["num_pairs"]

    @property
    def device(self) -> torch.device:
        """The device of the wrapped model's first parameter."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the wrapped model's first parameter (as diffusers pipelines ask of every component)."""
        return next(self.parameters()).dtype

    @torch.no_grad()
    def encode(
        self, preference_pairs: Sequence[Any], batch_size: int = 8, show_progress: bool | None = None
    ) -> torch.Tensor:
        """Encodes one user's pairs, or a list of users' pair lists, into user embeddings.

        Args:
            preference_pairs: ``num_pairs`` ``PreferencePair``s (or tuples/dicts) of one user, or a list
                with one such list per user.
            batch_size: Users encoded per forward pass.
            show_progress: Show a progress bar; by default only when there is more than one batch.

        Returns:
            A float32 tensor ``(users, num_tokens, embed_dim)`` on the encoder's device.
        """
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size}.")
        users = as_user_pairs(preference_pairs, self.num_pairs, max_side=self.max_image_side)
        batches = [users[i : i + batch_size] for i in range(0, len(users), batch_size)]
        show = len(batches) > 1 if show_progress is None else show_progress
        outputs = [self._encode_batch(batch) for batch in tqdm(batches, desc="Encoding users", disable=not show)]
        return torch.cat(outputs).float()

    def fingerprint(self) -> str:
        """A hash of what determines the embeddings: class, options, dtype, attention kernel, image processor
        and its settings, tokenizer vocabulary, and the weights themselves (see ``weights_digest``).

        Where the model was loaded from (path, Hub id, revision) does not count: the same weights give the
        same fingerprint, whether from the Hub, a local folder or the copy a saved encoder holds."""
        where = ("model_name_or_path", "revision", "subfolder")
        options = {k: v for k, v in self.config.items() if k not in where}
        identity = {"encoder_class": type(self).__name__, **options, **self._runtime_identity()}
        identity["weights"] = self.weights_digest()
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()

    @torch.no_grad()
    def weights_digest(self) -> str:
        """A hash of the wrapped model's weights as they are now, in one pass on their device.

        Each parameter and buffer contributes its name, shape, dtype and its sum and sum of squares in float64,
        rounded to 12 significant digits: new weights behind the same local path, or weights changed in
        memory after loading, give another digest, while moving the model between devices almost never
        does (a rounding boundary can, which only costs a cache miss).
        """
        digest = hashlib.sha256()
        for name, tensor in (*self.model.named_parameters(), *self.model.named_buffers()):
            if tensor.is_floating_point():
                total = torch.sum(tensor, dtype=torch.float64)
                squares = torch.linalg.vector_norm(tensor, dtype=torch.float64).square()
                stats = f"{total.item():.12g},{squares.item():.12g}"
            else:
                stats = str(int(tensor.sum(dtype=torch.int64)))
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{stats};".encode())
        return digest.hexdigest()

    def save_pretrained(self, save_directory: str | os.PathLike, copy_model: bool | None = None) -> None:
        """Writes ``preference_encoder_config.json`` (every option) and, for a local model, the model itself.

        A model loaded from the Hub is recorded by its id and the commit it resolved to, which loads the same
        weights anywhere. A model loaded from a local folder is copied into ``save_directory/model`` (its
        files as they are on disk: weights, config, tokenizer, image processor), so that the folder, or a Hub
        repo it is pushed to, loads elsewhere too; ``copy_model=False`` records the absolute path instead.

        Args:
            save_directory: The folder to write.
            copy_model: Copy the model's folder (default: when it is local). ``True`` for a Hub model raises.
        """
        from . import __version__

        os.makedirs(save_directory, exist_ok=True)
        config = {"encoder_class": type(self).__name__, "encoder_module": type(self).__module__, **self.config}
        config["ppd_diffusers_version"] = __version__
        source = os.path.join(self.config["model_name_or_path"], self.config.get("subfolder") or "")
        local = os.path.isdir(source)
        if copy_model if copy_model is not None else local:
            if not local:
                raise ValueError(
                    "`copy_model=True` copies a model loaded from a local folder; this one came from the Hub and is "
                    "recorded by id and commit."
                )
            target = os.path.join(save_directory, MODEL_FOLDER)
            if os.path.realpath(source) != os.path.realpath(target):
                shutil.copytree(source, target, dirs_exist_ok=True)
            config.update(model_name_or_path=f"./{MODEL_FOLDER}", subfolder=None, revision=None)
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload preference encoder",
        copy_model: bool | None = None,
    ) -> Any:
        """Uploads what ``save_pretrained`` writes to the Hub repo ``repo_id`` (created if needed).

        Returns:
            The ``huggingface_hub`` commit info of the upload.
        """
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, copy_model=copy_model)
            return api.upload_folder(repo_id=repo.repo_id, folder_path=folder, commit_message=commit_message)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        **kwargs: Any,
    ) -> BasePreferenceEncoder:
        """Loads a saved encoder folder, or wraps the pretrained model ``pretrained_model_name_or_path``.

        Args:
            pretrained_model_name_or_path: A folder (or Hub repo) with ``preference_encoder_config.json``,
                or the id/path of the model to wrap.
            subfolder: Where the encoder config lies inside the repo or folder.
            **kwargs: Encoder options (they override a saved config) and model loading arguments such as
                ``revision``, ``dtype`` and ``device_map``.
        """
        config = _find_encoder_config(os.fspath(pretrained_model_name_or_path), subfolder, kwargs.get("revision"))
        if config is None:
            if cls is BasePreferenceEncoder:
                raise ValueError(
                    f"`{pretrained_model_name_or_path}` holds no {CONFIG_NAME}: load a model with a concrete encoder "
                    "class, e.g. `PreferenceEncoder.from_pretrained(...)` or `CLIPPreferenceEncoder.from_pretrained`."
                )
            return cls._from_model(os.fspath(pretrained_model_name_or_path), subfolder=subfolder, **kwargs)
        name = config.pop("encoder_class", None)
        encoder_class = _encoder_class(name, config.pop("encoder_module", None))
        if encoder_class is None or not issubclass(encoder_class, cls):
            raise ValueError(
                f"{CONFIG_NAME} in `{pretrained_model_name_or_path}` names the encoder class {name!r}, which is not a "
                f"`{cls.__name__}`{'' if encoder_class else ' known here (import the module that defines it first)'}."
            )
        config.pop("ppd_diffusers_version", None)
        options = {key: config.pop(key) for key in encoder_class.config_keys if key in config}
        source = config.pop("model_name_or_path")
        if source.startswith("./"):  # a model copied beside the config: in that folder, or that Hub repo
            inner = os.path.join(subfolder or "", source[2:])
            root = os.fspath(pretrained_model_name_or_path)
            if os.path.isdir(root):
                source = os.path.join(root, inner)
            else:
                source, options["subfolder"] = root, inner
                options["revision"] = kwargs.pop("revision", None)
        return encoder_class._from_model(source, **{**options, **kwargs})


def _encoder_class(name: str | None, module: str | None) -> type[BasePreferenceEncoder] | None:
    """The encoder class a saved config names, importing the library module that defines it if needed.

    Only ppd-diffusers' own modules are imported on a config's word (a config may come from the Hub); an
    encoder class defined elsewhere must be imported by the caller first.
    """
    if name not in _ENCODER_CLASSES:
        module = _ENCODER_MODULES.get(name, module)
        if module is not None and module.split(".")[0] == "ppd_diffusers":
            importlib.import_module(module)
    return _ENCODER_CLASSES.get(name)


def _find_encoder_config(path: str, subfolder: str | None, revision: str | None) -> dict[str, Any] | None:
    folder = os.path.join(path, subfolder) if subfolder else path
    if os.path.isdir(path):
        file = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(file):
            return None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

        try:
            file = hf_hub_download(path, CONFIG_NAME, subfolder=subfolder, revision=revision)
        except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError):
            return None  # a plain model repo, or offline: the model loader reports what is missing
    with open(file) as f:
        return json.load(f)


def resolve_model_source(model_name_or_path: str, hub_kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Pins a model to what will be loaded: an absolute local path, or a Hub id at its commit hash.

    ``hub_kwargs`` (``revision``, ``subfolder``, ``token``, ``cache_dir``, ``local_files_only``) are
    returned with ``revision`` replaced by the resolved commit, so that the model, tokenizer and image
    processor all load the same snapshot and the encoder's config records it.
    """
    if os.path.isdir(model_name_or_path):
        return os.path.abspath(model_name_or_path), hub_kwargs
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(
        model_name_or_path,
        "config.json",
        **{
            k: v
            for k, v in hub_kwargs.items()
            if k in ("revision", "subfolder", "token", "cache_dir", "local_files_only")
        },
    )
    parts = Path(path).parts
    if "snapshots" in parts:
        hub_kwargs = {**hub_kwargs, "revision": parts[parts.index("snapshots") + 1]}
    return model_name_or_path, hub_kwargs


def pop_hub_kwargs(model_kwargs: dict[str, Any], revision: str | None, subfolder: str | None) -> dict[str, Any]:
    """The loading arguments shared by a model, its tokenizer and its image processor."""
    hub = {"revision": revision, "subfolder": subfolder}
    for key in ("token", "cache_dir", "local_files_only"):
        if key in model_kwargs:
            hub[key] = model_kwargs.pop(key)
    return {k: v for k, v in hub.items() if v is not None}


def load_processors(model_name_or_path: str, hub_kwargs: dict[str, Any], **tokenizer_kwargs: Any) -> tuple[Any, Any]:
    """The tokenizer and image processor of a model, from the same snapshot as the model."""
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, **hub_kwargs, **tokenizer_kwargs)
    return tokenizer, AutoImageProcessor.from_pretrained(model_name_or_path, **hub_kwargs)


def load_quietly(load: Any, *args: Any, **kwargs: Any) -> Any:
    """Loads a transformers model without its load report (a truncated model lists its dropped layers as
    unexpected weights), but still warns about weights the checkpoint lacks."""
    with quiet_transformers():
        model, info = load(*args, output_loading_info=True, **kwargs)
    if info.get("missing_keys"):
        logger.warning(
            "%s: weights missing from the checkpoint were randomly initialised: %s",
            type(model).__name__,
            sorted(info["missing_keys"])[:10],
        )
    return model


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silences transformers' load report, which lists the truncated layers as unexpected weights."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
