"""Images, buckets, captions, conditioning images and training batches read from the caches."""
