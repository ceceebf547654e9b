"""link_remap names from the images (issue 12): the manager deletes them on the real fs after
the replace, so only a link_remap.N beside the file it stands for is accepted."""

from __future__ import annotations

import pytest

from spfs.criu.images import ImageError, ImageSet, MountRecord, Remap, RegFile
from spfs.criu.stubtree import LinkedRemap, linked_remaps

DEV = 0x2A


def _images(remap_name: str) -> ImageSet:
    mount = MountRecord(mnt_id=7, root_dev=DEV, root="/", mountpoint="/mnt/nfs", source="srv:/a",
                        options="", ext_key="spfs-0")
    images = ImageSet(mounts={7: mount})
    images.files[1] = RegFile(1, "/mnt/nfs/dir/.nfs0000000000001", 7, 0, 0o100644, 5)
    images.files[2] = RegFile(2, remap_name, 7, 0, 0o100644, 5)
    images.remaps.append(Remap(1, 2, "LINKED"))
    return images


def test_a_link_remap_beside_its_file_is_taken() -> None:
    assert linked_remaps(_images("/mnt/nfs/dir/link_remap.3"), DEV) == [
        LinkedRemap("dir/.nfs0000000000001", "dir/link_remap.3")]


@pytest.mark.parametrize("name", [
    "/mnt/nfs/dir/passwd",              # not a link_remap name: the manager would delete it
    "/mnt/nfs/other/link_remap.3",      # another directory
    "/mnt/nfs/dir/sub/link_remap.3",    # deeper
    "/mnt/nfs/link_remap.3",            # the share's root, not beside the file
    "/mnt/nfs/dir/link_remap.3x",
])
def test_any_other_remap_name_is_refused(name: str) -> None:
    with pytest.raises(ImageError, match="is not a link_remap.N beside"):
        linked_remaps(_images(name), DEV)


def test_a_remap_outside_the_mount_is_refused() -> None:
    with pytest.raises(ImageError, match="not below its mount"):
        linked_remaps(_images("/etc/link_remap.3"), DEV)
