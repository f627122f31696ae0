# syntax_unclosed_paren.kt: a call whose `)` is missing
# expect: E100
graph syntax_unclosed_paren
data digits { val_split = 300 }
train {
  optimizer = sgd(lr=0.1
}
node a : cnn_tiny [target]
label -> a : through
