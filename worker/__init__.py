"""promptq's arq worker: settings factory, job function, LLM client and retry policy."""
