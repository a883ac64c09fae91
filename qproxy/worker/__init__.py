"""The worker side: moving files to S3 and removing deleted ones
(:mod:`~qproxy.worker.transfer`), finishing what crashes left half done
(:mod:`~qproxy.worker.sweep`, :mod:`~qproxy.worker.reconcile`), and the Celery app that runs
them (:mod:`~qproxy.worker.app`)."""
