"""Where examples come from, chosen by `data.source` ("KIND:ARG") from a registry.

| kind | file | reads |
|---|---|---|
| `folder:PATH` | folder.py | one subfolder per class, images anywhere below |
| `zip:PATH` | zip_archive.py | the same layout inside a .zip, read in place |
| `tfds:NAME` | tfds.py | a TensorFlow Datasets set, by random access |
| `generated:shapes` | generated.py | discs vs stripes drawn into the workdir (offline demo) |

`base.py` holds the protocol every source follows (`Source`), the registry (`register`,
`KINDS`) and `build_dataset`; `listed.py` what the file-listing kinds share (the class
layout, one decode of every file, the split by path hash); `held_out.py` held-out sets
for evaluation (`build_held_out`: every example, none split off, labelled by class name
in a model's classes; kinds that offer them register a lister with
`@register_held_out`). A new kind is one file with an `@register("kind")` builder,
imported before the config is used (a config file can import it).
"""

from jaxcls.data.sources.base import (IMAGE_EXTENSIONS, KINDS, SKIPPED_FILE, DataError,
                                      Dataset, Source, build_dataset, is_image_name,
                                      register, usable_cpu_count, worker_count)
from jaxcls.data.sources.held_out import (HELD_OUT_KINDS, HeldOut, build_held_out,
                                          register_held_out)
from jaxcls.data.sources.listed import (VERIFY_CACHE_FILE, index_classes, split_fraction,
                                        verify_files)
# The built-in kinds register themselves on import.
from jaxcls.data.sources import folder, generated, tfds, zip_archive  # noqa: E402,F401
from jaxcls.data.sources.folder import FileSource, list_folder  # noqa: E402
from jaxcls.data.sources.generated import draw_shapes  # noqa: E402
from jaxcls.data.sources.tfds import TfdsSource  # noqa: E402
from jaxcls.data.sources.zip_archive import MAX_MEMBER_BYTES, ZipSource, list_zip  # noqa: E402
