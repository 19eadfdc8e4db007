"""Small real OCI images for tests, benchmarks and the demo.

:func:`build_image` makes an image of N layers: each layer is a real tar archive holding
one file of incompressible bytes (optionally gzip-compressed, as most registries hold
them), a config blob with matching ``rootfs.diff_ids``, and an OCI (or Docker v2 schema 2)
manifest. :func:`build_index` combines per-platform images into an OCI index (or a Docker
manifest list). :func:`push_image` / :func:`push_index` upload them with
:class:`~p2pimage.oci.registry.RegistryClient`. Everything is deterministic for a given seed.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import tarfile
from dataclasses import dataclass

from p2pimage.oci.registry import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    RegistryClient,
    sha256_digest,
)


@dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data)}


@dataclass(frozen=True)
class BuiltImage:
    """One platform's image: ``manifest`` bytes of ``media_type``, its config and layers."""

    media_type: str
    manifest: bytes
    config: Blob
    layers: tuple[Blob, ...]
    os: str
    architecture: str

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)

    def blobs(self) -> tuple[Blob, ...]:
        return (self.config, *self.layers)


@dataclass(frozen=True)
class BuiltIndex:
    media_type: str
    manifest: bytes
    images: tuple[BuiltImage, ...]

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)


def tar_layer(content: bytes, name: str = "data.bin") -> bytes:
    """A tar archive with one regular file (fixed mtime/owner so it is reproducible)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(content)
        info.mtime = 0
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def build_image(
    layer_sizes: list[int],
    *,
    seed: int = 0,
    compress: bool = False,
    docker: bool = False,
    os: str = "linux",
    architecture: str = "amd64",
) -> BuiltImage:
    """An image whose layer ``i`` is a tar holding ``layer_sizes[i]`` random bytes."""
    rng = random.Random(f"{seed}/{os}/{architecture}")
    layers: list[Blob] = []
    diff_ids: list[str] = []
    for i, size in enumerate(layer_sizes):
        tar = tar_layer(rng.randbytes(size), f"layer{i}.bin")
        diff_ids.append(sha256_digest(tar))
        if compress or docker:
            data = gzip.compress(tar, compresslevel=1, mtime=0)
            media = DOCKER_LAYER_GZIP if docker else OCI_LAYER_GZIP
        else:
            data, media = tar, OCI_LAYER_TAR
        layers.append(Blob(media, data))
    config_doc = {
        "architecture": architecture,
        "os": os,
        "config": {"Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": f"p2pimage test layer {i}"} for i in range(len(layers))],
    }
    config = Blob(DOCKER_CONFIG if docker else OCI_CONFIG, _json(config_doc))
    media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    manifest = _json(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": config.descriptor(),
            "layers": [layer.descriptor() for layer in layers],
        }
    )
    return BuiltImage(media_type, manifest, config, tuple(layers), os, architecture)


def build_index(images: list[BuiltImage], *, docker: bool = False) -> BuiltIndex:
    """An OCI index (or Docker manifest list) of per-platform images."""
    media_type = DOCKER_MANIFEST_LIST if docker else OCI_INDEX
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [
            {
                "mediaType": img.media_type,
                "digest": img.digest,
                "size": len(img.manifest),
                "platform": {"os": img.os, "architecture": img.architecture},
            }
            for img in images
        ],
    }
    return BuiltIndex(media_type, _json(doc), tuple(images))


async def push_image(client: RegistryClient, repository: str, tag: str, image: BuiltImage) -> str:
    """Push blobs then the manifest (by tag). Returns the manifest digest."""
    for blob in image.blobs():
        await client.push_blob(repository, blob.data)
    return await client.push_manifest(repository, tag, image.manifest, image.media_type)


async def push_index(client: RegistryClient, repository: str, tag: str, index: BuiltIndex) -> str:
    """Push every platform image by digest, then the index by tag."""
    for image in index.images:
        for blob in image.blobs():
            await client.push_blob(repository, blob.data)
        await client.push_manifest(repository, image.digest, image.manifest, image.media_type)
    return await client.push_manifest(repository, tag, index.manifest, index.media_type)


def _json(doc: object) -> bytes:
    return json.dumps(doc, indent=2, sort_keys=True).encode()


__all__ = [
    "Blob",
    "BuiltImage",
    "BuiltIndex",
    "build_image",
    "build_index",
    "push_image",
    "push_index",
    "tar_layer",
]
