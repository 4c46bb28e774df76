"""Aborting the multipart uploads a dead writer left unfinished (through botocore).

An upload that a killed process started and never completed is invisible to every
reader, but its parts stay billed until it is aborted. obstore has no call to list them,
so the next writer asks botocore (installed with boto3), when it is there; without it a
bucket lifecycle rule (AbortIncompleteMultipartUpload) does this job. Importing this
module fails with ImportError when botocore is missing.
"""

from __future__ import annotations

import logging
import os

import botocore.session

__all__ = ["abort_unfinished_uploads"]

logger = logging.getLogger(__name__)


def abort_unfinished_uploads(bucket: str, prefix: str) -> int:
    """Abort every unfinished multipart upload under ``prefix``; how many. Failures are
    logged, never raised: the uploads are invisible to readers either way."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    aborted = 0
    try:
        client = botocore.session.get_session().create_client(
            "s3", endpoint_url=endpoint or None, region_name=region
        )
        pages = client.get_paginator("list_multipart_uploads").paginate(
            Bucket=bucket, Prefix=prefix
        )
        for page in pages:
            for upload in page.get("Uploads", []):
                client.abort_multipart_upload(
                    Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
                aborted += 1
    except Exception as exc:
        logger.warning("s3://%s/%s: unfinished uploads not aborted: %s", bucket, prefix, exc)
    if aborted:
        logger.info("s3://%s/%s: aborted %d unfinished uploads", bucket, prefix, aborted)
    return aborted
