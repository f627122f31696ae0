# view_unknown.kt: a misspelt view
# expect: E360
graph view_unknown
data digits { val_split = 300 }
node a : cnn_tiny [target, view=owm]
node b : cnn_tiny
edges * -> * : through
