"""segops-sync: mirror SegOps segments into Klaviyo lists."""
