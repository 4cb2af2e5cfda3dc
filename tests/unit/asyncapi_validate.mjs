// Validates an AsyncAPI document with the official parser (@asyncapi/parser, v3).
//
//   node tests/unit/asyncapi_validate.mjs <dir with node_modules/@asyncapi/parser> <document.yaml>
//
// Prints every diagnostic as "<severity> <code> at <path>: <message>" and exits 1 when any
// has error severity (or the parser produced no document), 0 otherwise. The parser is
// installed outside the tests (scripts/install-test-tools puts it in .tools/asyncapi), so it
// is resolved from the given directory rather than from this file's location.
import { createRequire } from 'node:module';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

const [toolsDir, documentPath] = process.argv.slice(2);
if (!toolsDir || !documentPath) {
  console.error('usage: node asyncapi_validate.mjs <tools dir> <document.yaml>');
  process.exit(2);
}

const require = createRequire(path.join(path.resolve(toolsDir), 'package.json'));
const entry = require.resolve('@asyncapi/parser');
const { Parser, fromFile, DiagnosticSeverity } = await import(pathToFileURL(entry).href);

const parser = new Parser();
const { document, diagnostics } = await fromFile(parser, documentPath).parse();

const names = { [DiagnosticSeverity.Error]: 'error', [DiagnosticSeverity.Warning]: 'warning',
  [DiagnosticSeverity.Information]: 'info', [DiagnosticSeverity.Hint]: 'hint' };
for (const d of diagnostics) {
  const where = (d.path || []).join('/') || '<root>';
  console.log(`${names[d.severity] ?? d.severity} ${d.code} at ${where}: ${d.message}`);
}
const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error).length;
if (errors > 0 || document === undefined) {
  console.log(`invalid: ${errors} error(s)${document === undefined ? ', no document' : ''}`);
  process.exit(1);
}
console.log(`valid: AsyncAPI ${document.version()}, ${document.channels().length} channels, `
  + `${document.operations().length} operations`);
