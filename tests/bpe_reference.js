// The reference side of tests/bpe_reference_test.sh and bench/bpe_vs_js.sh:
// npm's gpt-3-encoder (Encoder.js, unmodified) on a UTF-8 file.
//
//   node bpe_reference.js PACKAGE_DIR encode TEXT_FILE IDS_OUT
//       writes the token ids (one line, separated by spaces) and checks that
//       the package's decode gives the text back; exits 1 if not
//   node bpe_reference.js PACKAGE_DIR bench TEXT_FILE [REPEATS]
//       prints "js encode: X MB/s": the best of REPEATS passes (default 3),
//       each in a fresh copy of the module (an empty cache)
//
// Encoder.js's encode() appends each piece's tokens with Array.concat, which
// is quadratic in the length of its input, so the text is given to it in
// chunks of about 2,000 characters cut before a space that follows a
// non-space. No GPT-2 piece spans such a cut: every alternative of the
// pattern that can hold a non-space ends before a space, only `\s+` runs
// begin with one and their lookahead looks only forward, and nothing looks
// behind; so the pieces of the chunks are exactly the pieces of the whole
// text (the C++ side encodes the whole file at once).
'use strict';
const fs = require('fs');
const path = require('path');

const [pkgDir, command, textFile, arg] = process.argv.slice(2);
if (!pkgDir || !command || !textFile) {
  console.error('usage: node bpe_reference.js PACKAGE_DIR encode|bench TEXT_FILE [IDS_OUT|REPEATS]');
  process.exit(2);
}
const encoderPath = path.join(pkgDir, 'Encoder.js');
const load = () => {
  delete require.cache[require.resolve(encoderPath)];
  return require(encoderPath);
};

const isSpace = c => /\s/u.test(c);
function chunks(text, target) {
  const out = [];
  let start = 0;
  while (start < text.length) {
    let cut = Math.min(text.length, start + target);
    while (cut < text.length && !(text[cut] === ' ' && !isSpace(text[cut - 1]))) ++cut;
    out.push(text.slice(start, cut));
    start = cut;
  }
  return out;
}

const text = fs.readFileSync(textFile, 'utf-8');
const parts = chunks(text, 2000);
if (parts.join('') !== text) throw new Error('chunks do not join to the text');

if (command === 'encode') {
  const { encode, decode } = load();
  const ids = [];
  for (const part of parts) {
    for (const id of encode(part)) ids.push(id);
  }
  fs.writeFileSync(arg, ids.join(' ') + '\n');
  if (decode(ids) !== text) {
    console.error('bpe_reference: the package does not decode its own ids to the text');
    process.exit(1);
  }
  console.error(`bpe_reference: ${text.length} characters, ${parts.length} chunks, ${ids.length} tokens`);
} else if (command === 'bench') {
  const repeats = Math.max(1, parseInt(arg || '3', 10));
  const bytes = Buffer.byteLength(text, 'utf-8');
  let best = 0;
  let tokens = 0;
  for (let r = 0; r < repeats; ++r) {
    const { encode } = load();
    const start = process.hrtime.bigint();
    tokens = 0;
    for (const part of parts) tokens += encode(part).length;
    const s = Number(process.hrtime.bigint() - start) / 1e9;
    best = Math.max(best, bytes / 1e6 / s);
  }
  console.log(`js encode: ${best.toFixed(2)} MB/s (${bytes} bytes, ${tokens} tokens, best of ${repeats})`);
} else {
  console.error(`bpe_reference: unknown command ${command}`);
  process.exit(2);
}
