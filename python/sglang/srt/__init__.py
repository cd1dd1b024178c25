"""SGLang runtime (server, scheduler, models)."""
