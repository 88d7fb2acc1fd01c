"""Reports over run directories (between agents and app): runs into tables, plots and HTML/Markdown, plus each
attachment placed by the renderer it names (bench, claims and latency-sweep attach theirs; nothing here knows them)."""
