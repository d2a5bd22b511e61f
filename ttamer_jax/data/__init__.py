"""Layer 2, data: traces and what turns them into models and files.

The traces container (:mod:`.traces`), the checksummed archive format
(:mod:`.archive`, :mod:`.files`), tables (:mod:`.tables`, pandas on use),
discretisers and deployed policies (:mod:`.discretise`), fitting
(:mod:`.fitting`), cascade and policy files (:mod:`.cascade_io`,
:mod:`.policy_io`) and synthetic generators (:mod:`.synthetic`). Imports only
from ``core``. Public names are exported by :mod:`ttamer_jax`.
"""
