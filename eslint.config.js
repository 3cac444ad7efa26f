// Lint for the TypeScript sources: neostandard ("standard" style, which the code follows) with
// TypeScript support, a line-length limit, and a few type-aware rules for promises.
import neostandard from 'neostandard'

const maxLen = { code: 160, ignoreUrls: true }

export default [
  ...neostandard({ ts: true, noJsx: true, ignores: ['dist/**', 'coverage/**', '.tap/**', 'fuzz-out/**'] }),
  {
    rules: {
      '@stylistic/max-len': ['error', maxLen],
      // The code packs related properties several to a line when an object literal spans lines.
      '@stylistic/object-property-newline': 'off',
      // Loops that wait for a callback to change their condition (credits, flags, exited) are the point, not a slip.
      'no-unmodified-loop-condition': 'off',
      // The regular expressions that match control characters (names, terminal escapes) mean to.
      'no-control-regex': 'off',
      // `void promise` marks a promise left to run on purpose; no-floating-promises asks for exactly that.
      'no-void': ['error', { allowAsStatement: true }],
    },
  },
  {
    // Typed rules read the whole program through tsconfig.json: they double the lint's CPU time (about 25 s here) and catch
    // promises nobody awaits, in the library and in the tests, whose rejection would be lost or come after the test ended.
    files: ['**/*.ts'],
    languageOptions: { parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname } },
    rules: {
      '@typescript-eslint/no-floating-promises': ['error', {
        // tap runs the subtests t.test() hands back; their promise needs no await.
        allowForKnownSafePromises: [{ from: 'package', name: 'PromiseWithSubtest', package: '@tapjs/core' }],
      }],
      '@typescript-eslint/no-misused-promises': 'error',
      '@typescript-eslint/await-thenable': 'error',
      '@typescript-eslint/only-throw-error': 'error',
      '@typescript-eslint/prefer-promise-reject-errors': 'error',
      // The typed rules above see through `as` casts, which their untyped namesakes take for non-errors.
      'no-throw-literal': 'off',
      'prefer-promise-reject-errors': 'off',
      // `for await (const _ of records) n++` counts; as tsc's noUnusedLocals, a leading _ says "unused on purpose".
      '@typescript-eslint/no-unused-vars': ['error', { args: 'none', caughtErrors: 'none', ignoreRestSiblings: true, vars: 'all', varsIgnorePattern: '^_' }],
    },
  },
  {
    // Test tables hold shell commands, expected messages and case rows as long literals.
    files: ['test/**'],
    rules: { '@stylistic/max-len': ['error', { ...maxLen, ignoreStrings: true, ignoreTemplateLiterals: true, ignoreRegExpLiterals: true }] },
  },
]
