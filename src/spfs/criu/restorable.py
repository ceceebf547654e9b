"""Whether criu-spfs restore will accept an image directory: the checks the restore runs
before it mounts anything, runnable on their own.

The restore runs them first of all; `criu-spfs dump` runs them right after CRIU has dumped,
while the source's tasks are still stopped, so that a container whose images we would
refuse is resumed where it was instead of lost (dump.py).
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from spfs.criu.images import ImageError, ImageSet, check_image_dir, load_images
from spfs.criu.record import RecordedShare, RecordError, load_record
from spfs.criu.stubtree import LinkedRemap, build_manifest, linked_remaps
from spfs.fs.manifest import Manifest, ManifestError, dump_manifest, load_manifest


class RestoreError(RuntimeError):
    pass


@dataclass
class ShareRestore:
    share: RecordedShare
    manifest: Manifest | None = None  # from the images, once checked
    remaps: list[LinkedRemap] = field(default_factory=list)
    staging: Path | None = None

    @property
    def id(self) -> str:
        return self.share.key


def load_shares(images: Path) -> list[ShareRestore]:
    """The shares the dump recorded: enough to run CRIU (staging dirs, external mounts)."""
    try:
        shares = [ShareRestore(share) for share in load_record(images)]
        for s in shares:
            s.share.primary  # a share with only sub-directory binds cannot be replaced
        return shares
    except RecordError as e:
        raise RestoreError(f"refusing the image directory {images}: {e}") from None


def check_images(images: Path, shares: list[ShareRestore]) -> ImageSet:
    """Each share's manifest and linked remaps from the images, everything checked; raises
    RestoreError naming what is wrong."""
    try:
        image_set = load_images(images)
        for restore in shares:
            share = restore.share
            for m in share.mounts:
                # CRIU took a bind's sub-root from mountinfo, where NFS shows "/" for every
                # bind; the dump record has the real one (from the bind's source)
                dumped = image_set.mounts.get(m.mnt_id)
                if dumped is not None and dumped.root != m.root:
                    image_set.mounts[m.mnt_id] = dataclasses.replace(dumped, root=m.root)
            dumped = image_set.mounts.get(share.mounts[0].mnt_id)
            if dumped is None:
                raise RestoreError(f"{share.key}: mount {share.mounts[0].mnt_id} is not in "
                                   f"the images")
            restore.manifest = build_manifest(image_set, dumped.root_dev)
            restore.remaps = linked_remaps(image_set, dumped.root_dev)
    except (ImageError, ManifestError) as e:
        raise RestoreError(f"refusing the image directory {images}: {e}") from None
    return image_set


def check_image_names(images: Path) -> None:
    """Only regular files and directories of them (check_image_dir), as a RestoreError."""
    try:
        check_image_dir(images)
    except ImageError as e:
        raise RestoreError(f"refusing the image directory {images}: {e}") from None


def check_restorable(images: Path) -> list[ShareRestore]:
    """Everything the restore checks before it mounts: the image dir's names, the record
    of the shares, the images, and each share's manifest as SPFS will validate it when it
    loads it (written out and read back). The shares, checked; RestoreError otherwise."""
    check_image_names(images)
    shares = load_shares(images)
    check_images(images, shares)
    with tempfile.TemporaryDirectory(prefix="criu-spfs-check-") as tmp:
        for s in shares:
            assert s.manifest is not None
            path = Path(tmp) / f"{s.id}.json"
            dump_manifest(s.manifest, path)
            try:
                load_manifest(path)
            except ManifestError as e:
                raise RestoreError(f"refusing the image directory {images}: share {s.id}: "
                                   f"SPFS would refuse its manifest: {e}") from None
    return shares
