"""One adapter per HTTP library: each only translates that library's pool calls into pool events."""
