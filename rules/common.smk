# Shared helpers: the typed config (a typo fails here, before any job) and path helpers.
import fluxpipe
from fluxpipe import workflow as fw
from fluxpipe.config import load_pipeline

CFG = load_pipeline(config)
FLUXPIPE_VERSION = fluxpipe.__version__
VALIDATE_REPORT = fw.VALIDATE_REPORT
