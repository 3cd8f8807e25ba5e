"""The file names and format strings hetero writes and reads, in one place. In the device core (plain
constants, no imports) so that the standalone runner, copied to a device alone, reads the same names
as the exporter that wrote them."""

# an export directory: the artifacts and their manifest
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "hetero-manifest"
MANIFEST_VERSION = 1

# a checkpoint directory (hetero train-cloud / train-edge / import-cloud / fit-classifier)
CHECKPOINT_FILE = "hetero.json"
CHECKPOINT_FORMAT = "hetero-checkpoint"
WEIGHTS_FILE = "weights.safetensors"

# every output directory hetero writes says what kind of output it is
OUTPUT_MARKER = ".hetero-output.json"
OUTPUT_MARKER_FORMAT = "hetero-output"
REPORT_FILE = "report.json"  # evaluate, verify and demo reports

# JSON documents, by their "schema" field
LATENCY_SCHEMA = "hetero-latency/1"  # bench --json
LATENCY_COMPARE_SCHEMA = "hetero-latency-compare/1"  # bench --compare --json
VERIFY_SCHEMA = "hetero-verify/1"  # verify's report.json
SEARCH_SCHEMA = "hetero-nas-search/1"  # search's pareto.json
LATENCY_TABLE_SCHEMA = "hetero-latency-lut/1"  # the architecture search's latency look-up table

# documents by their "format" field
ARCH_FORMAT = "hetero-arch"  # arch.json: a searched architecture and its search space
SUPERNET_FORMAT = "hetero-supernet"  # a supernet directory's meta
TRAIN_STATE_FORMAT = "hetero-train-state"  # the resumable state of a train-* run

RUNNER_ZIP_COMMENT = b"hetero-runner/1"  # the comment of a zip from `hetero pack-runner`
